"""The pass manager: pipeline strings, presets, option types, requirements, verification,
instrumentation and reproducers."""
import dataclasses
import io
import os
import typing
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import bmc
from bmc import ir, passmgr, zoo
from bmc.errors import PassFailure, PipelineError, RequirementError, VerificationError
from bmc.passmgr.instruments import DumpDir, PrintIR, Reproducer, Statistics, Timing
from bmc.passmgr.manager import Pass, PassManager, PassResult, format_value, parse_pipeline, register_pass

passmgr.load_builtin_passes()


def _non_default(field, hints):
    tp = hints[field.name]
    default = field.default
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ([c for c in typing.get_args(tp) if c != default] or [default])[-1]
    if tp is bool:
        return not default
    if tp is int:
        return default + 3
    if tp is float:
        return default * 2 + 0.5
    if tp is str:
        return "some value"
    if origin is tuple:
        return ("a.*", "b")
    return default


def _full_spec(name):
    cls = passmgr.REGISTRY[name].Options
    hints = typing.get_type_hints(cls)
    options = ",".join(f"{f.name}={format_value(_non_default(f, hints))}" for f in dataclasses.fields(cls))
    return f"{name}{{{options}}}" if options else name


@pytest.mark.parametrize("name", sorted(passmgr.REGISTRY))
def test_every_registered_pass_round_trips(name):
    for text in (name, _full_spec(name)):
        pipeline = parse_pipeline(text)
        assert str(pipeline) == text
        assert parse_pipeline(str(pipeline)) == pipeline
        options = pipeline.passes[0].make_options()
        assert isinstance(options, passmgr.REGISTRY[name].Options)


def test_pipeline_with_several_passes_round_trips():
    text = "dce{drop_unused_params=true},shape-prop,annotate-cost,verify"
    assert str(parse_pipeline(text)) == text
    assert str(parse_pipeline(" dce { drop_unused_params = true } , verify ")) == "dce{drop_unused_params=true},verify"
    assert str(parse_pipeline(["dce", "verify"])) == "dce,verify"


def test_presets_expand():
    assert str(parse_pipeline("cleanup,verify")) == "dce,shape-prop,verify"
    with pytest.raises(PipelineError, match="preset 'cleanup' takes no options"):
        parse_pipeline("cleanup{x=1}")


def test_unknown_pass_lists_close_names():
    with pytest.raises(PipelineError, match=r"unknown pass 'dcee'; did you mean dce\?") as info:
        parse_pipeline("dcee")
    assert "known passes:" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, column", [
    ("dce{drop_unused_params=true", 28), ("dce,,verify", 5), ("dce}", 4), ("dce{=1}", 5),
    ("dce{drop_unused_params}", 23), ("", None)])
def test_malformed_pipeline_points_at_the_column(text, column):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    message = str(info.value)
    assert "\n" not in message
    if column is not None:
        assert f"at column {column}:" in message


def test_wrong_option_type_and_unknown_option():
    with pytest.raises(PipelineError, match=r"option 'drop_unused_params' of pass 'dce' expects true\|false, got 'yes'"):
        parse_pipeline("dce{drop_unused_params=yes}")
    with pytest.raises(PipelineError, match="pass 'dce' has no option 'ratio'.*its options: drop_unused_params"):
        parse_pipeline("dce{ratio=0.5}")
    with pytest.raises(PipelineError, match="given an option twice"):
        parse_pipeline("dce{drop_unused_params=true,drop_unused_params=false}")


def test_option_values_of_every_type(fresh_registry):
    @dataclass(frozen=True)
    class Opts:
        n: int = 1
        ratio: float = 0.5
        on: bool = False
        mode: Literal["a", "b"] = "a"
        name: str = "x"
        skip: tuple[str, ...] = ()
        limit: typing.Optional[int] = None

    @register_pass("typed-test", options=Opts)
    class Typed(Pass):
        """A pass with one option of each type."""

        def run(self, gm):
            return PassResult(gm, False)

    text = 'typed-test{n=4,ratio=0.25,on=true,mode=b,name="a b",skip=[lm_head,"x,y"],limit=none}'
    pipeline = parse_pipeline(text)
    assert pipeline.passes[0].make_options() == Opts(4, 0.25, True, "b", "a b", ("lm_head", "x,y"), None)
    assert str(pipeline) == text
    with pytest.raises(PipelineError, match="expects one of a\\|b"):
        parse_pipeline("typed-test{mode=c}")
    with pytest.raises(PipelineError, match="expects an int"):
        parse_pipeline("typed-test{n=two}")


def _tiny_graph():
    torch.manual_seed(0)
    return bmc.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                     (torch.randn(3, 4),))


def test_requirements_are_checked_before_anything_runs(fresh_registry):
    ran = []

    @register_pass("needs-cost", requires=("cost",))
    class NeedsCost(Pass):
        """A pass that reads bmc.cost annotations."""

        def run(self, gm):
            ran.append("needs-cost")
            return PassResult(gm, False)

    gm = _tiny_graph()
    with pytest.raises(RequirementError, match="requires 'cost'.*add annotate-cost before it"):
        PassManager("verify,needs-cost").run(gm)
    with pytest.raises(RequirementError, match="invalidated by 'dce'"):
        PassManager("annotate-cost,dce,needs-cost").run(gm)
    assert ran == [] and not any(ir.get(n, ir.Cost) for n in gm.graph.nodes), "nothing may run before the check"
    PassManager("annotate-cost,needs-cost").run(gm)
    assert ran == ["needs-cost"]


def test_verification_after_each_pass_catches_a_broken_graph(fresh_registry):
    @register_pass("break-meta")
    class BreakMeta(Pass):
        """Adds a node without copying meta, as a careless pass would."""

        def run(self, gm):
            relu = next(n for n in gm.graph.nodes if ir.target_str(n) == "aten.relu")
            with gm.graph.inserting_after(relu):
                bad = gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
            relu.replace_all_uses_with(bad, delete_user_cb=lambda user: user is not bad)
            return PassResult(gm, True)

    @register_pass("break-shard")
    class BreakShard(Pass):
        """Shards a dim that the tensor does not have."""

        def run(self, gm):
            relu = next(n for n in gm.graph.nodes if ir.target_str(n) == "aten.relu")
            ir.annotate(relu, ir.Shard((ir.Placement("tp", "shard", 5),)))
            return PassResult(gm, True)

    with pytest.raises(VerificationError, match="after pass 'break-meta'.*has no meta\\['val'\\]"):
        PassManager("break-meta").run(_tiny_graph())
    with pytest.raises(VerificationError, match="after pass 'break-shard'.*splits dim 5 of a 2-d tensor"):
        PassManager("break-shard").run(_tiny_graph())
    PassManager("break-shard", verify=False).run(_tiny_graph())  # verification can be turned off


def test_verifier_catches_use_before_definition():
    gm = _tiny_graph()
    first, second = [n for n in gm.graph.nodes if ir.target_str(n) == "aten.linear"]
    first.args = (second,) + first.args[1:]
    with pytest.raises(VerificationError, match="invalid graph"):
        PassManager("verify").run(gm)


def test_instruments_print_dump_time_and_count(tmp_path):
    out = io.StringIO()
    timing, stats = Timing(), Statistics()
    dump = DumpDir(str(tmp_path / "dumps"))
    instruments = [PrintIR(out, after=("annotate-cost",)), dump, timing, stats]
    PassManager("dce,shape-prop,annotate-cost,verify", instruments=instruments).run(_tiny_graph())
    printed = out.getvalue()
    assert printed.count("IR Dump After") == 1 and "After annotate-cost (#3)" in printed
    files = sorted(os.listdir(tmp_path / "dumps"))
    txt = [f for f in files if f.endswith(".txt")]
    assert txt == ["00-input.txt", "01-dce.txt", "02-shape-prop.txt", "03-annotate-cost.txt", "04-verify.txt"]
    assert len([f for f in files if f.endswith(".dot")]) == 5
    body = (tmp_path / "dumps" / "01-dce.txt").read_text()
    assert body.startswith("// after dce: no change") and "aten.linear" in body and "f32[3, 8]" in body
    assert [name for name, _ in timing.rows] == ["dce", "shape-prop", "annotate-cost", "verify"]
    assert "nodes-annotated" in stats.format()


def test_print_ir_after_change_and_all():
    out = io.StringIO()
    PassManager("dce,verify", instruments=[PrintIR(out, after_change=True)]).run(_tiny_graph())
    assert "IR Dump" not in out.getvalue()  # nothing changed
    PassManager("dce,verify", instruments=[PrintIR(out, after_all=True)]).run(_tiny_graph())
    assert out.getvalue().count("IR Dump After") == 2


def test_failing_pass_writes_a_reproducer_that_bmc_opt_reruns(fresh_registry, tmp_path, capsys):
    @register_pass("explode")
    class Explode(Pass):
        """Fails on any graph with a ReLU, like a pass with a bug."""

        def run(self, gm):
            if any(ir.target_str(n) == "aten.relu" for n in gm.graph.nodes):
                raise RuntimeError("cannot handle relu")
            return PassResult(gm, False)

    repro = tmp_path / "repro"
    with pytest.raises(PassFailure, match="pass 'explode' \\(#2\\) failed: RuntimeError: cannot handle relu") as info:
        PassManager("dce,explode", instruments=[Reproducer(str(repro))]).run(_tiny_graph())
    assert f"reproducer written to {repro}" in str(info.value)
    assert (repro / "pipeline.txt").read_text().strip() == "dce,explode"
    assert (repro / "input.pt2").exists()
    from bmc.cli.opt import main
    assert main(["--run-reproducer", str(repro)]) == 2
    assert "RuntimeError: cannot handle relu" in capsys.readouterr().err


def test_pass_declaration_is_checked(fresh_registry):
    with pytest.raises(TypeError, match="docstring"):
        @register_pass("no-doc")
        class NoDoc(Pass):
            def run(self, gm):
                return PassResult(gm, False)
    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass("bad-options", options=dict)
    with pytest.raises(ValueError, match="already registered"):
        @register_pass("dce")
        class Again(Pass):
            """Dup."""


def test_describe_lists_every_pass_and_preset():
    text = passmgr.describe_passes()
    for name in list(passmgr.REGISTRY) + list(passmgr.PRESETS):
        assert name in text


def test_progress_shows_each_pass_on_a_terminal_and_nothing_when_piped():
    import io

    from bmc.passmgr.instruments import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = zoo.build("gpt-tiny")
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        bmc.compile(model, passes="dce,shape-prop", example_inputs=model.example_inputs(),
                    instruments=[Progress(stream)])
        text = stream.getvalue()
        if shown:
            assert "pass 1/2 dce ..." in text and "pass 2/2 shape-prop ..." in text and text.endswith("\r\x1b[K")
        else:
            assert text == ""
