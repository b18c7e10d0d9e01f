"""Helpers of scripts/mlflow_check.sh.

make-images DIR
    Writes a small two-class ImageFolder of PNGs (standard library only):
    bright discs on dark ground ("disc") and stripes ("stripes").

check DATABASE STORE EXPORT_JSON
    Reads the MLflow file store STORE back with MLflow itself
    (mlflow.search_runs, MlflowClient.get_metric_history) and compares it
    with lazarus's experiments database DATABASE (opened read-only):
    the same experiments and runs (no duplicates), status, start and end
    times, params, tags, every per-step metric value with its step and
    timestamp, every summary metric, and the run files as artifacts.
    EXPORT_JSON is `lazarus experiments export --json`'s output (for the
    keys MLflow needed rewritten). Exits 1 on the first difference.
"""

import json
import math
import os
import sqlite3
import struct
import sys
import zlib

STATUS = {"RUNNING": "RUNNING", "FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED"}


def png(path, width, height, pixel):
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row.extend(pixel(x, y))
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 9)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def make_images(folder, per_class=40, size=48):
    for label in ("disc", "stripes"):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
    for i in range(per_class):
        noise = lambda x, y: (x * 31 + y * 17 + i * 13) % 23
        cx, cy, r = 16 + i % 16, 18 + (i * 7) % 12, 8 + i % 6

        def disc(x, y):
            n = noise(x, y)
            if (x - cx) ** 2 + (y - cy) ** 2 < r * r:
                return (210 + n // 2, 190 + n // 2, 70)
            return (30 + n, 35 + n, 45 + n)

        def stripes(x, y):
            n = noise(x, y)
            return (60 + n, 140 + n, 200) if ((x + i) // 4) % 2 == 0 else (20 + n, 30 + n, 40 + n)

        png(os.path.join(folder, "disc", f"{i:03}.png"), size, size, disc)
        png(os.path.join(folder, "stripes", f"{i:03}.png"), size, size, stripes)


def fail(message):
    print(f"MISMATCH: {message}", file=sys.stderr)
    sys.exit(1)


def check(database, store, export_json):
    import mlflow
    from mlflow.tracking import MlflowClient

    with open(export_json) as handle:
        exported = json.load(handle)
    renamed = exported["renamed_keys"]
    uri = "file://" + os.path.abspath(store)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)

    db = sqlite3.connect(f"file:{os.path.abspath(database)}?mode=ro", uri=True)
    runs = db.execute(
        "SELECT r.id, e.name, r.status, r.start_ms, r.end_ms, r.dataset, r.config_hash "
        "FROM runs r JOIN experiments e ON e.id = r.experiment_id ORDER BY r.id"
    ).fetchall()
    names = sorted({run[1] for run in runs})
    experiments = {}
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            fail(f"experiment {name!r} is not in the store")
        experiments[name] = experiment.experiment_id

    frame = mlflow.search_runs(experiment_ids=list(experiments.values()), max_results=50000)
    if len(frame) != len(runs):
        fail(f"mlflow.search_runs finds {len(frame)} runs, the database has {len(runs)}")
    by_name = {}
    for _, row in frame.iterrows():
        name = row["tags.mlflow.runName"]
        if name in by_name:
            fail(f"run {name} is in the store twice")
        by_name[name] = row

    values = steps = params = summaries = artifacts = 0
    for run_id, experiment, status, start_ms, end_ms, dataset, config_hash in runs:
        if run_id not in by_name:
            fail(f"run {run_id} is missing from mlflow.search_runs")
        row = by_name[run_id]
        mlflow_id = exported["run_ids"][run_id]
        if row["run_id"] != mlflow_id:
            fail(f"run {run_id}: MLflow id {row['run_id']}, export said {mlflow_id}")
        if row["experiment_id"] != experiments[experiment]:
            fail(f"run {run_id} is in experiment {row['experiment_id']}, not {experiments[experiment]}")
        if row["status"] != STATUS[status]:
            fail(f"run {run_id}: status {row['status']}, lazarus {status}")
        run = client.get_run(mlflow_id)
        if run.info.start_time != start_ms or run.info.end_time != end_ms:
            fail(f"run {run_id}: times {run.info.start_time}..{run.info.end_time}, lazarus {start_ms}..{end_ms}")
        if run.data.tags.get("lazarus.config_hash") != config_hash or run.data.tags.get("lazarus.dataset") != dataset:
            fail(f"run {run_id}: lazarus.* tags differ")
        for key, value in db.execute("SELECT key, value FROM tags WHERE run_id = ?", (run_id,)):
            if run.data.tags.get(renamed.get(key, key)) != value:
                fail(f"run {run_id}: tag {key} is {run.data.tags.get(key)!r}, lazarus {value!r}")

        for key, number, text in db.execute(
            "SELECT key, value_number, value_text FROM params WHERE run_id = ?", (run_id,)
        ):
            got = row.get(f"params.{renamed.get(key, key)}")
            if text is not None:
                ok = got == text
            else:
                ok = got is not None and float(got) == number
            if not ok:
                fail(f"run {run_id}: param {key} is {got!r}, lazarus {number if text is None else text!r}")
            params += 1

        series = {}
        for key, step, value, time_ms in db.execute(
            "SELECT key, step, value, time_ms FROM metrics WHERE run_id = ? ORDER BY key, step", (run_id,)
        ):
            series.setdefault(key, []).append((step, value, time_ms))
        for key, points in series.items():
            history = client.get_metric_history(mlflow_id, renamed.get(key, key))
            got = sorted((m.step, m.value, m.timestamp) for m in history)
            if got != points:
                fail(f"run {run_id}: history of {key} is {got}, lazarus {points}")
            values += len(points)
            steps = max(steps, max(p[0] for p in points))
        for key, value in db.execute("SELECT key, value FROM summary_metrics WHERE run_id = ?", (run_id,)):
            exported_key = f"summary/{key}" if key in series else key
            exported_key = renamed.get(exported_key, exported_key)
            got = row.get(f"metrics.{exported_key}")
            if got is None or not (got == value or (math.isnan(got) and math.isnan(value))):
                fail(f"run {run_id}: summary metric {key} is {got!r} in search_runs, lazarus {value!r}")
            summaries += 1

        listed = set()
        pending = [None]
        while pending:
            folder = pending.pop()
            for item in client.list_artifacts(mlflow_id, folder):
                if item.is_dir:
                    pending.append(item.path)
                else:
                    listed.add(item.path)
        for (path,) in db.execute("SELECT path FROM artifacts WHERE run_id = ?", (run_id,)):
            if path.startswith("checkpoints/"):
                continue
            if path not in listed:
                fail(f"run {run_id}: artifact {path} is not in MLflow's artifact list")
            artifacts += 1

    print(
        f"MLflow {mlflow.__version__} reads {len(runs)} runs in {len(names)} experiments from {store}: "
        f"{params} params, {values} per-step metric values (steps up to {steps}) with their timestamps, "
        f"{summaries} summary metrics and {artifacts} artifacts, all equal to lazarus's database."
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-images":
        make_images(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
