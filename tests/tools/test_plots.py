"""Pictures: each command writes its file (a real PNG, not empty), and the schedule the
pipeline picture draws has the bubble the textbook formula gives."""
import json

import pytest

from bmc.cli import plots
from bmc.cli.opt import main as bmc_opt
from bmc.cli.plot import main as bmc_plot

PNG = b"\x89PNG\r\n\x1a\n"


def _is_picture(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_bmc_opt_plot_writes_memory_and_the_pipeline_schedule(tmp_path, capsys):
    assert bmc_opt(["zoo:gpt-tiny", "--pass=tp2,zero1,pp{stages=2,microbatches=4}", "--world-size", "8",
                    "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("memory.png", "pipeline.png"):
        assert _is_picture(tmp_path / name) and f"wrote {tmp_path / name}" in out
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
    # without pp there is no schedule to draw
    assert bmc_opt(["zoo:gpt-tiny", "--pass=zero3", "--world-size", "2", "--plot", str(tmp_path / "dp")]) == 0
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == ["memory.png"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, microbatches", [(2, 4), (4, 8), (3, 3)])
def test_the_schedule_has_the_textbook_bubble(schedule, stages, microbatches):
    """Equal stages: the step takes (M + S - 1) stage times and idles (S - 1) / (M + S - 1) of
    them, for GPipe and 1F1B alike; every forward runs after the stage before's, every
    backward after the stage after's, and no stage runs two things at once."""
    slots = plots.simulate(schedule, [1.0] * stages, microbatches)
    assert len(slots) == 2 * stages * microbatches
    makespan = max(s.end for s in slots)
    assert makespan == pytest.approx(microbatches + stages - 1)
    busy = sum(s.end - s.start for s in slots)
    assert 1 - busy / (stages * makespan) == pytest.approx((stages - 1) / (microbatches + stages - 1))
    at = {(s.stage, s.kind, s.microbatch): s for s in slots}
    for s in slots:
        if s.kind == "F" and s.stage > 0:
            assert s.start >= at[(s.stage - 1, "F", s.microbatch)].end
        if s.kind == "B":
            before = at[(s.stage + 1, "B", s.microbatch)] if s.stage < stages - 1 else at[(s.stage, "F", s.microbatch)]
            assert s.start >= before.end
    for stage in range(stages):
        mine = sorted((s for s in slots if s.stage == stage), key=lambda s: s.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))


def test_1f1b_keeps_fewer_microbatches_in_flight_than_gpipe():
    for schedule, most in (("gpipe", 8), ("1f1b", 4)):
        order = plots.schedule_order(schedule, 0, 4, 8)
        live = peak = 0
        for kind, _ in order:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        assert peak == most, (schedule, peak)


def test_bmc_plot_overlays_loss_curves_and_refuses_what_is_not_a_run(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.9)):
        run = tmp_path / name
        run.mkdir()
        (run / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": scale * (5 - s / 10)}) + "\n"
                                                for s in range(20)))
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"pipeline": "zero3", "world_size": 2}))
    picture = tmp_path / "loss.png"
    assert bmc_plot([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(picture)]) == 0
    assert _is_picture(picture)
    assert plots._run_label(str(tmp_path / "b")) == "b (zero3, 2 ranks)"
    capsys.readouterr()
    assert bmc_plot([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no loss.jsonl" in err and not (tmp_path / "x.png").exists()
    (tmp_path / "a" / "loss.jsonl").write_text("not json\n")
    assert bmc_plot([str(tmp_path / "a")]) == 2
    assert "loss.jsonl:1 is not a loss record" in capsys.readouterr().err
