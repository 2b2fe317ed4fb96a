"""An output directory read by another tool (DuckDB) with only what the README's "Output format" section says:
the tables, their column types, the commit rule. It must agree with reeltag's own reader, on an output that holds
a replaced video, a long video committed in parts and a killed run's uncommitted shards."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.writer import STREAM_SCHEMA, OutputWriter, read_table

duckdb = pytest.importorskip("duckdb", reason="duckdb is a test dependency (pip install -e '.[test]')")
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _rows(vid: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [{"kind": "segment", "video_id": vid, "uri": f"/a/{vid}.mp4", "segment_id": i, "start_s": float(i),
             "end_s": i + 1.0, "frame_times_s": [float(i)], "embedding": rng.standard_normal(8).astype(np.float32),
             "tags": [{"label": "run", "score": 0.5, "confidence": 0.7}], "region_tags": [], "backend": "pyav",
             "stage": "", "error_type": "", "message": ""} for i in range(n)]
    return rows + [{"kind": "end", "video_id": vid, "uri": f"/a/{vid}.mp4", "n_segments": n, "stage": "",
                    "error_type": "", "message": ""}]


@pytest.fixture
def out(tmp_path) -> Path:
    for seed in (1, 2):  # "again" is done twice (its file changed): its latest commit wins
        writer = OutputWriter(tmp_path, config_hash="c1", model="clip:m", shard_rows=4,
                              fingerprints={"/a/again.mp4": f"{seed}:{seed}"})
        writer.add(pa.Table.from_pylist(_rows("again", 3, seed), schema=STREAM_SCHEMA))
        writer.flush()
    writer = OutputWriter(tmp_path, config_hash="c1", model="clip:m", shard_rows=4)
    writer.add(pa.Table.from_pylist(_rows("long", 10, 3), schema=STREAM_SCHEMA))  # parts of 4, 4, then 2 + commit
    writer.add(pa.Table.from_pylist([{"kind": "end", "video_id": "bad", "uri": "/a/bad.mp4", "n_segments": 0,
                                      "stage": "decode", "error_type": "unreadable", "message": "not a video"}],
                                    schema=STREAM_SCHEMA))
    writer.flush()
    killed = OutputWriter(tmp_path, config_hash="c1", model="clip:m", shard_rows=4)
    killed.add(pa.Table.from_pylist(_rows("killed", 9, 4)[:9], schema=STREAM_SCHEMA))  # two parts, no commit
    return tmp_path


def test_the_readme_names_every_column_of_every_table_with_its_type(out):
    section = README.split("### Output format (a contract)\n", 1)[1].split("\n## ", 1)[0]
    for table in ("segments", "errors", "manifest"):
        shard = next((out / table).glob("part-*.parquet"))
        schema = duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{shard}')").fetchall()
        for name, *_ in schema:
            assert re.search(rf"`{name}`", section), f"README does not name {table}.{name}"
    import pyarrow.parquet as pq

    shard = next((out / "segments").glob("part-*.parquet"))
    assert pq.read_schema(shard).field("embedding").type == pa.list_(pa.float32(), 8)  # Arrow readers: fixed size
    # Parquet itself has no fixed-size list: DuckDB reads a FLOAT[] of one length, which casts to the array type
    # its vector functions take
    widths = duckdb.sql(f"SELECT DISTINCT len(embedding) FROM read_parquet('{out}/segments/part-*.parquet')")
    assert widths.fetchall() == [(8,)]
    cosine = duckdb.sql(f"SELECT min(array_cosine_similarity(embedding::FLOAT[8], embedding::FLOAT[8])) "
                        f"FROM read_parquet('{out}/segments/part-*.parquet')").fetchall()[0][0]
    assert cosine == pytest.approx(1.0, abs=1e-5)


def test_duckdb_with_the_commit_rule_reads_what_reeltag_reads(out):
    """The README's rule in SQL: per (video, config) the latest manifest row whose parts all exist; its rows are
    those in the shard named like the commit's manifest shard and in its parts."""
    present = {p.name for p in (out / "segments").glob("part-*.parquet")} | \
        {p.name for p in (out / "errors").glob("part-*.parquet")}
    con = duckdb.connect()
    con.execute("CREATE TABLE present (name VARCHAR)")
    con.executemany("INSERT INTO present VALUES (?)", [(n,) for n in present])
    commits = f"""
        WITH m AS (SELECT *, regexp_extract(filename, '[^/]+$') AS shard
                   FROM read_parquet('{out}/manifest/part-*.parquet', filename = true, union_by_name = true)),
        complete AS (SELECT * FROM m WHERE NOT EXISTS (
                       SELECT 1 FROM unnest(coalesce(m.parts, [])) AS p(name)
                       WHERE p.name NOT IN (SELECT name FROM present))),
        latest AS (SELECT * FROM complete QUALIFY row_number() OVER (
                     PARTITION BY video_id, config_hash ORDER BY committed_at DESC) = 1)
        SELECT video_id, config_hash, shard AS name FROM latest
        UNION ALL SELECT video_id, config_hash, unnest(parts) FROM latest"""
    segments = con.sql(f"""
        SELECT s.video_id, s.segment_id, s.embedding
        FROM read_parquet('{out}/segments/part-*.parquet', filename = true) s
        JOIN ({commits}) c ON s.video_id = c.video_id AND s.config_hash = c.config_hash
                           AND regexp_extract(s.filename, '[^/]+$') = c.name
        ORDER BY 1, 2""").fetchall()
    ours = read_table(out, "segments").sort_by([("video_id", "ascending"), ("segment_id", "ascending")])
    assert [(v, s) for v, s, _ in segments] == list(zip(ours["video_id"].to_pylist(), ours["segment_id"].to_pylist()))
    assert {v for v, _, _ in segments} == {"again", "long"}  # not the killed run's parts
    for (_, _, e), mine in zip(segments, ours["embedding"].to_pylist()):
        np.testing.assert_array_equal(np.array(e, np.float32), np.array(mine, np.float32))
    errors = con.sql(f"SELECT video_id, error_type FROM read_parquet('{out}/errors/part-*.parquet')").fetchall()
    assert errors == [("bad", "unreadable")]
