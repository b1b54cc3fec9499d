"""The README stays true: its test command is what CI runs, its table is the committed results."""

import json
from pathlib import Path

from scorefast.bench import markdown_table, render_table, sampler_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    install_and_sample, install_and_test = _commands()
    assert "scorefast sample" in install_and_sample and "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()


def _block(name: str) -> str:
    return README.split(f"<!-- bench:{name} -->\n", 1)[1].split(f"\n<!-- /bench:{name} -->", 1)[0]


def test_readme_tables_are_rendered_from_committed_results():
    micro = json.loads((ROOT / "bench" / "results" / "cpu.json").read_text())
    assert _block("cpu") == markdown_table(micro)
    e2e = json.loads((ROOT / "bench" / "results" / "cpu-e2e.json").read_text())
    assert _block("cpu-e2e") == sampler_table(e2e)

    for suite in ("cpu-likelihood", "cpu-compat", "cpu-train", "glue-ops"):
        results = json.loads((ROOT / "bench" / "results" / f"{suite}.json").read_text())
        assert results["suite"] == suite
        assert _block(suite) == render_table(results)
