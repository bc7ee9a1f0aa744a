"""The full pipeline as a Prefect flow:
extract audio + visual -> fine-tune -> re-extract visual -> train -> evaluate.

The flow takes a config (a YAML path and/or a dict, plus `key=value` overrides) and passes paths between tasks.
A second run of the same config reuses every stage (the artifact store's keys decide); a changed fine-tuning
config re-runs fine-tuning, visual re-extraction, training and evaluation, and reuses the audio features;
`force` names stages to recompute together with everything downstream of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.tasks import evaluate_task, extract_task, finetune_task, prepare_dataset, results_table, train_task
from pipeline.ave.finetune import retrieval_line
from pipeline.ave.pipeline_config import forced_stages, resolve_config
from pipeline.config import dump_config


@flow(name="avel-pipeline", log_prints=True)
def full_pipeline(config_path: str | None = None, config: dict | None = None, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline on one dataset. Returns per-stage outcomes and the final metrics."""
    t0 = time.perf_counter()
    cfg = resolve_config(config_path, config, overrides)
    forced = forced_stages(force or [])
    root = str(cfg.root)
    c = dump_config(cfg)
    dataset = prepare_dataset(c["dataset"], root)
    outcomes = []

    audio = _extract(dataset, c["extract"], root, "audio", "extract_audio", "extract_audio" in forced)
    # the initial encoder's features depend on the dataset only: recomputed when named, not when fine-tuning is
    visual0 = _extract(dataset, c["extract"], root, "visual", "extract_visual (initial encoder)",
                       "extract_visual" in (force or []))
    outcomes += [audio, visual0]
    visual = visual0
    if not cfg.skip_finetune:
        ft = finetune_task(dataset, audio["path"], c["finetune"], root, c["extract"]["resnet_weights"],
                           cfg.extract.random_init, "finetune" in forced)
        # the fine-tuned weights are a new file: a new visual extraction key; audio features are untouched
        ft_extract = {**c["extract"], "resnet_weights": ft["weights"], "random_init": False}
        visual = _extract(dataset, ft_extract, root, "visual", "extract_visual (fine-tuned)",
                          "extract_visual" in forced)
        outcomes += [ft, visual]
    trained = train_task(dataset, visual["path"], audio["path"], c["train"], root, "train", "train" in forced)
    comparison = None
    if cfg.baseline and not cfg.skip_finetune:
        comparison = baseline_comparison(dataset, {"initial encoder": visual0, "fine-tuned encoder": visual}, audio,
                                         c["train"], cfg.comparison_seeds(), root, "train" in forced, outcomes,
                                         ft["retrieval_before"], ft["retrieval_after"])
    evaluated = evaluate_task(trained["checkpoint"], dataset, visual["path"], audio["path"], root,
                              cfg.evaluate_split, "evaluate" in forced)
    outcomes += [trained, evaluated]

    create_table_artifact(results_table(outcomes), key="pipeline-stages", description="stages: reused or computed")
    metrics = [{"metric": "test accuracy (val-selected checkpoint)" if cfg.train.select_on == "val"
                else "test accuracy (best-on-test, optimistic)", "value": round(evaluated["accuracy"], 2)},
               {"metric": "best-on-test accuracy (reference protocol)",
                "value": round(trained["best_on_test_accuracy"], 2)},
               {"metric": "all-background baseline", "value": round(evaluated["all_background_accuracy"], 2)},
               {"metric": "event F1", "value": round(evaluated["event_f1"], 2)}]
    create_table_artifact(metrics, key="pipeline-metrics", description=f"final metrics ({cfg.train.model} localizer)")
    warnings = sorted({w for o in outcomes for w in o.get("warnings", [])})
    return {"dataset": dataset, "stages": outcomes, "model": cfg.train.model, "accuracy": evaluated["accuracy"],
            "retrieval": None if cfg.skip_finetune else retrieval_line(ft["retrieval_before"],
                                                                      ft["retrieval_after"]),
            "baseline": comparison,
            "all_background_accuracy": evaluated["all_background_accuracy"], "split": cfg.evaluate_split,
            "warnings": warnings, "seconds": round(time.perf_counter() - t0, 1)}


def _extract(dataset: str, extract_cfg: dict, root: str, modality: str, label: str, force: bool) -> dict:
    """One extraction stage: a task here, or sharded over a Dask cluster (`extract.cluster`, flows.sharded) as a
    subflow; the same artifact and outcome either way."""
    if not extract_cfg.get("cluster"):
        return extract_task(dataset, extract_cfg, root, modality, label, force)
    from flows.sharded import run_sharded_extract
    from flows.tasks import publish

    t0 = time.perf_counter()
    r = run_sharded_extract(Path(dataset), {**extract_cfg, "modality": modality}, Path(root), extract_cfg["cluster"],
                            extract_cfg["shard_videos"], force)[modality]
    return publish(f"extract_{modality}", label, Path(r["path"]).parent, r["reused"], time.perf_counter() - t0,
                   {"path": r["path"], "random_init": r["random_init"], "failed_rows": r["failed_rows"],
                    "cluster": extract_cfg["cluster"]})


def baseline_comparison(dataset: str, features: dict[str, dict], audio: dict, train_cfg: dict, seeds: list[int],
                        root: str, force: bool, outcomes: list, before: dict | None, after: dict | None) -> dict:
    """The localizer trained on each visual feature set with the same seeds: per seed and mean +- std of the test
    accuracy (val-selected checkpoint). A seed equal to the main run's reuses its training. Published as a table
    artifact and written to <root>/reports/baseline-<keys>.md."""
    import statistics

    from pipeline.store import write_text_atomic

    rows = []
    for label, visual in features.items():
        accs, keys = [], []
        for seed in seeds:
            o = train_task(dataset, visual["path"], audio["path"], {**train_cfg, "seed": seed}, root,
                           f"train ({label}, seed {seed})", force)
            outcomes.append(o)
            accs.append(o["test_accuracy"])
            keys.append(o["key"])
        rows.append({"visual features": label, "seeds": ", ".join(map(str, seeds)),
                     "test accuracy mean": round(statistics.mean(accs), 2),
                     "std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                     "per seed": ", ".join(f"{a:.2f}" for a in accs), "extraction key": visual["key"],
                     "train keys": ", ".join(keys)})
    create_table_artifact(rows, key="baseline-comparison", description="localizer on the initial vs the fine-tuned "
                                                                         "encoder's features, same seeds")
    lines = ["# Fine-tuning's effect on the localizer", "",
             f"Localizer test accuracy (%, val-selected checkpoint), seeds {', '.join(map(str, seeds))}.", "",
             "| visual features | mean +- std | per seed |", "|---|---|---|"]
    lines += [f"| {r['visual features']} | {r['test accuracy mean']:.2f} +- {r['std']:.2f} | {r['per seed']} |"
              for r in rows]
    line = retrieval_line(before, after)
    if line:
        lines += ["", f"Fine-tuning, held-out {line}"]
    if any("RANDOM WEIGHTS" in w for o in outcomes for w in o.get("warnings", [])):
        lines += ["", "RANDOM WEIGHTS: these runs started from randomly initialised encoders (testing only)."]
    path = Path(root) / "reports" / f"baseline-{rows[0]['extraction key']}-{rows[1]['extraction key']}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return {"rows": rows, "report": str(path)}


def run_quietly(log: Path, fn):
    """`fn()` with Prefect's and Dask's own output in `log` and live progress on the terminal; Prefect's temporary
    server stopped before returning (what the CLI's sharded extraction commands run their flows in)."""
    from pipeline.progress import RichReporter, quiet_native_output, use_reporter

    with quiet_native_output(log) as term, use_reporter(RichReporter(term)):
        try:
            result = fn()
        except BaseException as e:  # Ctrl-C, SIGTERM (not an Exception): stop the server now, draining little
            stop_temporary_server(10 if isinstance(e, Exception) else 2)
            raise
        stop_temporary_server()
        return result


def stop_temporary_server(drain_s: float = 10) -> None:
    """Stop Prefect's temporary local server now (it would otherwise stop at interpreter exit, printing to a
    terminal that `avel run` keeps for its own output). No-op with a configured server. `drain_s`: how long the
    log and event workers get to send what they hold (an interrupted command gives them little)."""
    from prefect._internal.concurrency.services import QueueService
    from prefect.server.api.server import SubprocessASGIServer

    servers = list(SubprocessASGIServer._instances.values())
    if drain_s > 0 and any(s.server_process is not None for s in servers):
        # first send what the log and event workers still hold, or they retry against a stopped server at exit
        # ("Error logging to API")
        QueueService.drain_all(timeout=drain_s, at_exit=False)
    for server in servers:
        server.stop()

