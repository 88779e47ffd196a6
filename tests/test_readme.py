"""The README's first screen promises two commands; CI must run the test one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:3]
    return [block.split("\n```")[0].strip() for block in blocks]


def test_readme_first_screen_has_run_and_test_commands():
    run, test = _commands()
    assert run.endswith("mdpo-ray train") and "pip install torch==2.13.0" in run
    assert test.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    _, test = _commands()
    assert test in (ROOT / ".ci" / "run").read_text()
