"""The README is the front door: it documents every config key, and CI runs its test command."""

import dataclasses
import re
from pathlib import Path

from pipeline.config import PipelineSpec

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_every_config_key_is_documented_in_its_section():
    for section in (f for f in dataclasses.fields(PipelineSpec) if f.metadata.get("yaml", True)):
        match = re.search(rf"### `{section.name}`\n(.*?)(?=\n### |\n## )", README, re.S)
        assert match, f"README has no table for the {section.name} section"
        for key in dataclasses.fields(section.type if isinstance(section.type, type) else
                                      getattr(__import__("pipeline.config", fromlist=["x"]), section.type)):
            assert f"| `{key.name}` |" in match.group(1), f"README does not document {section.name}.{key.name}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README and "make demo" in README
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
