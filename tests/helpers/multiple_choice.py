"""A multiple-choice task of twelve stories: the right ending among three nonsense ones."""

import json
import random
from pathlib import Path

SUBJECTS = ["the red fox", "a tired sailor", "my old teacher", "the small robot", "our new neighbour",
            "the village baker", "a quiet student", "the brave pilot", "an honest farmer", "the young painter",
            "a curious child", "the night guard"]
RIGHT = ["jumped over the fence", "went home to sleep", "read the morning paper", "cleaned the kitchen floor",
         "planted tomatoes in spring", "baked fresh bread at dawn", "wrote notes in the library",
         "landed the plane safely", "sold apples at the market", "painted the harbour at sunset",
         "asked why the sky is blue", "locked the gate at midnight"]
WRONG = ["purple integral sandwich", "seventeen loud umbrellas", "the oxygen of triangles", "quantum spoon ballet",
         "orbiting cheese lawyers", "electric velvet algebra"]


def write_task(path: Path, layout: str = "hellaswag") -> Path:
    """Twelve questions of four choices: the right ending among three nonsense ones, the answer moving."""
    rng = random.Random(0)
    lines = []
    for number, (subject, right) in enumerate(zip(SUBJECTS, RIGHT)):
        choices = rng.sample(WRONG, 3)
        answer = number % 4
        choices.insert(answer, right)
        context = f"In the story, {subject}"
        record = ({"ctx": context, "endings": choices, "label": str(answer)} if layout == "hellaswag"
                  else {"context": context, "choices": choices, "answer": answer})
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path
