"""Facts of the Kaggle "Galaxy Zoo - The Galaxy Challenge" layout and its decision tree."""

CSV_NAME = "training_solutions_rev1.csv"
IMAGES_DIR = "images_training_rev1"
IMAGE_SIZE_PX = 424

# Answers per question, in CSV column order (Class1.1 ... Class11.6).
ANSWERS_PER_QUESTION = {1: 3, 2: 2, 3: 2, 4: 2, 5: 4, 6: 2, 7: 3, 8: 7, 9: 3, 10: 3, 11: 6}
CLASS_COLUMNS = [f"Class{q}.{a}" for q, n in ANSWERS_PER_QUESTION.items() for a in range(1, n + 1)]

# The answer whose vote fraction each question's answers sum to (None: asked of everyone, sums to 1).
PARENT_ANSWER = {
    1: None, 2: "Class1.2", 3: "Class2.2", 4: "Class2.2", 5: "Class2.2", 6: None,
    7: "Class1.1", 8: "Class6.1", 9: "Class2.1", 10: "Class4.1", 11: "Class4.1",
}


def question_columns(question: int) -> list[str]:
    """The CSV columns holding the answers to one question."""
    return [f"Class{question}.{a}" for a in range(1, ANSWERS_PER_QUESTION[question] + 1)]
