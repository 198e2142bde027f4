"""One declaration per shared flag: the engine, sampling and serving flags read the same on every command."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from tandemlm.cli.flag_groups import EngineFlags, SamplingFlags, ServeFlags, with_flags
from tandemlm.cli.main import app

runner = CliRunner()


def _options(command: str) -> dict[str, typer.core.TyperOption]:
    group = typer.main.get_command(app)
    found = group.commands[command]  # type: ignore[attr-defined]
    return {param.name: param for param in found.params if isinstance(param, typer.core.TyperOption)}


def _same(a: typer.core.TyperOption, b: typer.core.TyperOption) -> bool:
    return (a.opts, a.help, a.default) == (b.opts, b.help, b.default)


@pytest.mark.parametrize("group", [EngineFlags, SamplingFlags, ServeFlags])
def test_each_group_reads_the_same_on_every_command_that_takes_it(group: type) -> None:
    takers = {EngineFlags: ["generate", "chat", "serve", "quantize"], SamplingFlags: ["generate", "chat"],
              ServeFlags: ["serve", "quantize"]}[group]
    names = [field for field in group.__dataclass_fields__]
    first = _options(takers[0])
    for command in takers[1:]:
        options = _options(command)
        for name in names:
            if (group, name, command) == (SamplingFlags, "max_tokens", "chat"):
                continue  # chat's own default, checked below
            assert _same(options[name], first[name]), f"{command} --{name} differs from {takers[0]}'s"


def test_a_command_may_change_a_default_and_gets_one_instance_per_group() -> None:
    assert _options("chat")["max_tokens"].default == 512 and _options("generate")["max_tokens"].default == 256
    seen = {}
    demo = typer.Typer()

    @demo.command()
    @with_flags(engine=EngineFlags, sampling=(SamplingFlags, {"temperature": 0.0}))
    def run(engine: EngineFlags, sampling: SamplingFlags, name: str = "x") -> None:
        seen.update(engine=engine, sampling=sampling, name=name)

    result = runner.invoke(demo, ["--n-ctx", "64", "--top-k", "5", "--name", "y"])
    assert result.exit_code == 0, result.output
    assert seen["engine"] == EngineFlags(n_ctx=64) and seen["sampling"] == SamplingFlags(top_k=5, temperature=0.0)
    assert seen["name"] == "y"
    with pytest.raises(TypeError, match="n_ctx is both a flag of a group and its own"):
        with_flags(engine=EngineFlags)(lambda engine, n_ctx=1: None)


def test_quantize_serve_refuses_a_backend_it_cannot_serve_with_before_quantizing() -> None:
    result = runner.invoke(app, ["quantize", "smollm2", "--type", "q8_0", "--serve", "--backend", "transformers"])
    assert result.exit_code != 0
    assert "--serve serves Q8_0 with the llama.cpp backend; drop --backend transformers" in result.output
