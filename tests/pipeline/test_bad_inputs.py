"""Every class of bad input found so far, table-driven: `reeltag validate` answers each with exit 2 and one line
per problem naming the file, the line or the key; never a traceback, and never after expanding it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _good(root: Path, archive: Path, model: Path) -> str:
    return f"input: {{paths: ['{archive}']}}\nmodel: {{pretrained: '{model}'}}\noutput: {{dir: '{root}/out'}}\n"


def _bytes(root: Path, good: str) -> bytes:
    return good.encode() + b"# caf\xe9 in Latin-1\n"


def _deep(root: Path, good: str) -> str:
    return good + "tags: " + "[" * 3000 + "]" * 3000 + "\n"


def _alias_bomb(root: Path, good: str) -> str:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
                                                     for p, n in zip("abcdefgh", "bcdefghi")]
    return good + "x-bomb:\n" + "".join(f"  {line}\n" for line in levels)


def _vocab(root: Path, good: str) -> str:
    (root / "labels.txt").write_text("running\njumping\nrunning\n")
    return good + f"tags: {{vocabulary: '{root}/labels.txt'}}\n"


def _manifest(content: bytes, name: str = "list.jsonl"):
    def make(root: Path, good: str) -> str:
        (root / name).write_bytes(content)
        return good.replace("input: {paths:", f"input: {{manifest: '{root}/{name}', paths:")
    return make


# (case, how to make the config from a good one, what the one line says)
CASES = [
    ("not UTF-8", _bytes, "not UTF-8 text"),
    ("3,000-deep nesting", _deep, "nested deeper than"),
    ("a YAML alias bomb", _alias_bomb, "more values than 10,000"),
    ("an infinite timeout", lambda r, g: g + "decode: {timeout_s: .inf}\n", "decode.timeout_s: must be a finite"),
    ("a watchdog that never waits", lambda r, g: g + "ray: {unschedulable_s: 0}\n",
     "ray.unschedulable_s: must be > 0 and at most 86400"),
    ("a number that explodes work", lambda r, g: g + "sampling: {frames: 100000}\n",
     "sampling.frames: must be > 0 and at most 512"),
    ("a repeated vocabulary label", _vocab, "tags.vocabulary: "),
    ("a manifest line that is not JSON", _manifest(b'{"uri": "a.mp4"}\n{"uri": \n'), "list.jsonl:2: not valid JSON"),
    ("a manifest line without uri", _manifest(b'{"path": "a.mp4"}\n'), "list.jsonl:1: each line needs a 'uri'"),
    ("a manifest that is not text", _manifest(b"\xff\xfe\x00bad", "list.txt"), "input.manifest: cannot read"),
    ("a tag that would run code", lambda r, g: g + "hack: !!python/object/apply:os.system [ls]\n",
     "not valid YAML"),
    ("a duplicate key", lambda r, g: g + "output: {dir: /tmp/b}\n", "output: duplicate key"),
    ("an unknown key", lambda r, g: g + "segments: {windows_s: 2}\n", "segments.windows_s: unknown key"),
    ("an unknown section", lambda r, g: g + "modle: {}\n", "modle: unknown key"),
    ("a directory that does not exist", lambda r, g: g.replace("input: {paths: ['", "input: {paths: ['/no/such"),
     "input.paths.0: not found: /no/such"),
]


@pytest.mark.parametrize("case, make, says", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_naming_what_and_where(case, make, says, tmp_path, archive, tiny_clip_dir):
    content = make(tmp_path, _good(tmp_path, archive, tiny_clip_dir))
    config = tmp_path / "pipeline.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "validate", str(config)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    header, *problems = result.stderr.strip().splitlines()
    assert header == "reeltag: invalid pipeline definition:" and len(problems) == 1, result.stderr
    assert says in problems[0] and (str(config) in problems[0] or "tags.vocabulary" in problems[0]), problems[0]


def test_a_home_relative_output_dir_is_the_users_home(tmp_path, archive, tiny_clip_dir):
    """``output.dir: ~/x`` created a directory literally named ``~`` in the working directory."""
    from pipeline.config import parse_spec

    spec = parse_spec(_good(tmp_path, archive, tiny_clip_dir).replace(f"{tmp_path}/out", "~/reeltag-out"))
    assert spec.output.dir == str(Path.home() / "reeltag-out")
