"""The course's chapters: one source for chapter 00's table and the README's syllabus.

`cpu_seconds` is what `make course` printed for the chapter on the course's reference machine
(2 CPU cores, no GPU); tests check that every chapter listed as ready has its files.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chapter", "CHAPTERS"]


@dataclass(frozen=True)
class Chapter:
    number: str  # "01"
    title: str
    notebook: str  # path from the repository root
    modules: tuple[str, ...]  # the lokr_edu modules that are the chapter's answer key
    needs: str  # what the chapter needs beyond the package's install
    cpu_seconds: int | None  # measured by `make course` on 2 cores; None = not written yet
    exercises: str | None  # path of the exercise notebook, None if the chapter has none

    @property
    def ready(self) -> bool:
        return self.cpu_seconds is not None


CHAPTERS: list[Chapter] = [
    Chapter("00", "Setup", "notebooks/00_setup.ipynb", (), "nothing", 4, None),
    Chapter(
        "01",
        "The Kronecker product",
        "notebooks/01_kronecker_product.ipynb",
        ("lokr_edu/kron.py",),
        "CPU",
        12,
        "exercises/01_kronecker_product_exercises.ipynb",
    ),
    Chapter(
        "02",
        "PEFT and LoRA",
        "notebooks/02_peft_and_lora.ipynb",
        ("lokr_edu/lowrank.py",),
        "CPU",
        16,
        "exercises/02_peft_and_lora_exercises.ipynb",
    ),
    Chapter(
        "03",
        "LoHa and LoKr on SD1.5",
        "notebooks/03_loha_and_lokr.ipynb",
        ("lokr_edu/lowrank.py", "lokr_edu/sd15.py"),
        "CPU",
        38,
        "exercises/03_loha_and_lokr_exercises.ipynb",
    ),
    Chapter(
        "04",
        "An adapter library from scratch",
        "notebooks/04_adapter_from_scratch.ipynb",
        ("lokr_edu/adapters.py", "lokr_edu/kron_apply.py", "lokr_edu/io.py"),
        "CPU",
        12,
        "exercises/04_adapter_from_scratch_exercises.ipynb",
    ),
    Chapter(
        "05",
        "Fine-tuning on a laptop CPU",
        "notebooks/05_finetune_on_cpu.ipynb",
        ("lokr_edu/toy.py",),
        "CPU",
        73,
        "exercises/05_finetune_on_cpu_exercises.ipynb",
    ),
    Chapter(
        "06",
        "Attention and where LoRA goes",
        "notebooks/06_attention_and_lora.ipynb",
        ("lokr_edu/attention.py",),
        "CPU",
        14,
        "exercises/06_attention_and_lora_exercises.ipynb",
    ),
    Chapter(
        "07",
        "DreamBooth on a tiny Stable Diffusion",
        "notebooks/07_stable_diffusion_lokr.ipynb",
        (
            "lokr_edu/diffusion.py",
            "lokr_edu/sd_data.py",
            "lokr_edu/sd_sampling.py",
            "lokr_edu/digits_sd.py",
            "lokr_edu/train.py",
        ),
        "CPU",
        309,
        "exercises/07_stable_diffusion_lokr_exercises.ipynb",
    ),
    Chapter(
        "08",
        "Your own concept on Stable Diffusion 1.5",
        "notebooks/08_your_own_concept.ipynb",
        ("lokr_edu/sd_class_images.py", "lokr_edu/sd_recipes.py"),
        "GPU for SD1.5; a stand-in on CPU",
        40,
        None,  # a lab on the student's own images; chapter 07's exercises cover its parts
    ),
]


def _kind_counts(chapter: Chapter) -> str:
    """ "(8: 5 implement, 1 predict, ...)": the chapter's exercises by kind, read off the headings
    of its solutions notebook (`lokr_edu.exercises.exercise_kinds`)."""
    from collections import Counter

    from lokr_edu.course import repository_root
    from lokr_edu.exercises import KINDS, exercise_kinds

    solution = chapter.exercises.replace("exercises", "solutions")
    kinds = Counter(exercise_kinds(repository_root() / solution).values())
    parts = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
    return f"({sum(kinds.values())}: {parts})"


def markdown_table() -> str:
    """The README's syllabus table (tests/test_project.py checks the README contains it)."""
    lines = [
        "| ch | chapter | notebook | modules | needs | CPU time | exercises |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in CHAPTERS:
        notebook = f"[{c.notebook}]({c.notebook})" if c.ready else c.notebook
        module = ", ".join(f"`{m}`" for m in c.modules) or "—"
        time = f"~{c.cpu_seconds} s" if c.ready else "planned"
        exercises = f"[{c.exercises}]({c.exercises}) {_kind_counts(c)}" if c.exercises else "—"
        lines.append(
            f"| {c.number} | {c.title} | {notebook} | {module} | {c.needs} | {time} | {exercises} |"
        )
    return "\n".join(lines)
