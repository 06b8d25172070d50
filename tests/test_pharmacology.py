"""pharmacology.py: the built-in fictional domain states every fact it asks about, and only the right option."""
import pharmacology


def test_fictional_domain_questions_are_answerable_from_the_documents():
    world = pharmacology.make_world(0)
    docs = " ".join(pharmacology.world_documents(world, 0))
    questions = pharmacology.world_questions(world, 0)
    assert len(questions) == 4 * len(world)
    for q in questions:
        assert len(set(q["options"])) == 4
        right = q["stem"] + " " + q["options"][q["answer"]]
        assert right in docs  # the cloze statement of the right answer is stated in the textbook
        assert all(q["stem"] + " " + o + " " not in docs + " " for i, o in enumerate(q["options"]) if i != q["answer"])
    assert pharmacology.world_documents(pharmacology.make_world(1), 1) != pharmacology.world_documents(world, 0)
