"""The course's chapters: one source for chapter 00's table and the README's syllabus.

A chapter's `cpu_seconds` is not typed here: `python -m lokr_edu.course run` (`make course`)
measures each lecture and writes its time, with the machine it ran on, into one results file,
`lokr_edu/data/chapter_times.json` (`TIMES_FILE`); this module reads it. Tests check that every
chapter listed as ready has its files, and that no time is written into this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Chapter", "CHAPTERS", "TIMES_FILE", "read_times"]

TIMES_FILE = Path(__file__).resolve().parent / "data" / "chapter_times.json"


def read_times(path: Path = TIMES_FILE) -> dict[str, int]:
    """Each measured lecture's time in whole seconds, by notebook path ("notebooks/01_....ipynb"),
    from the results file that `python -m lokr_edu.course run` writes."""
    chapters = json.loads(path.read_text(encoding="utf-8"))["chapters"]
    return {notebook: entry["seconds"] for notebook, entry in chapters.items()}


@dataclass(frozen=True)
class Chapter:
    number: str  # "01"
    title: str
    notebook: str  # path from the repository root
    modules: tuple[str, ...]  # the lokr_edu modules that are the chapter's answer key
    needs: str  # what the chapter needs beyond the package's install
    cpu_seconds: int | None  # measured by `make course` (TIMES_FILE); None = not measured yet
    exercises: str | None  # path of the exercise notebook, None if the chapter has none

    @property
    def ready(self) -> bool:
        return self.cpu_seconds is not None


_TIMES = read_times()


def _listed(
    number: str,
    title: str,
    notebook: str,
    modules: tuple[str, ...],
    needs: str,
    exercises: str | None,
) -> Chapter:
    """A chapter of the syllabus, with its time from the results file (None: not measured yet)."""
    return Chapter(number, title, notebook, modules, needs, _TIMES.get(notebook), exercises)


CHAPTERS: list[Chapter] = [
    _listed("00", "Setup", "notebooks/00_setup.ipynb", (), "nothing", None),
    _listed(
        "01",
        "The Kronecker product",
        "notebooks/01_kronecker_product.ipynb",
        ("lokr_edu/kron.py",),
        "CPU",
        "exercises/01_kronecker_product_exercises.ipynb",
    ),
    _listed(
        "02",
        "PEFT and LoRA",
        "notebooks/02_peft_and_lora.ipynb",
        ("lokr_edu/lowrank.py",),
        "CPU",
        "exercises/02_peft_and_lora_exercises.ipynb",
    ),
    _listed(
        "03",
        "LoHa and LoKr on SD1.5",
        "notebooks/03_loha_and_lokr.ipynb",
        ("lokr_edu/lowrank.py", "lokr_edu/sd15.py"),
        "CPU",
        "exercises/03_loha_and_lokr_exercises.ipynb",
    ),
    _listed(
        "04",
        "An adapter library from scratch",
        "notebooks/04_adapter_from_scratch.ipynb",
        ("lokr_edu/adapters.py", "lokr_edu/kron_apply.py", "lokr_edu/io.py"),
        "CPU",
        "exercises/04_adapter_from_scratch_exercises.ipynb",
    ),
    _listed(
        "05",
        "Fine-tuning on a laptop CPU",
        "notebooks/05_finetune_on_cpu.ipynb",
        ("lokr_edu/toy.py",),
        "CPU",
        "exercises/05_finetune_on_cpu_exercises.ipynb",
    ),
    _listed(
        "06",
        "Attention and where LoRA goes",
        "notebooks/06_attention_and_lora.ipynb",
        ("lokr_edu/attention.py",),
        "CPU",
        "exercises/06_attention_and_lora_exercises.ipynb",
    ),
    _listed(
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
        "exercises/07_stable_diffusion_lokr_exercises.ipynb",
    ),
    _listed(
        "08",
        "Your own concept on Stable Diffusion 1.5",
        "notebooks/08_your_own_concept.ipynb",
        ("lokr_edu/sd_class_images.py", "lokr_edu/sd_recipes.py"),
        "GPU for SD1.5; a stand-in on CPU",
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
