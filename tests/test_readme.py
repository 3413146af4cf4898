"""The README's examples run as pasted: the plug-in objective (its code and its command), and they end sane; every
relative link of the README, the docs and the results pages resolves."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import derived_config
from train import cli_main

README = Path("README.md").read_text()


def plugin_example() -> tuple[str, list[str]]:
    """The Python block and the command's arguments (after `train.py`) of 'Plugging in your own objective'."""
    section = README.split("### Plugging in your own objective")[1].split("\n## ")[0]
    code = section.split("```python\n")[1].split("```")[0]
    command = section.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    words = shlex.split(command)
    return code, words[words.index("train.py") + 1:]


def quick_sft(tmp_path: Path) -> str:
    """The quickstart SFT stage for one epoch (~10 s): a policy that ends its answers, as the example starts from."""
    export = str(tmp_path / "sft")
    config = derived_config("configs/quickstart/sft.yaml", tmp_path, {
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}},
                    "callbacks": [{"class_path": "callbacks.export.HFExport", "init_args": {"dirpath": export}}]},
        "data": {"init_args": {"source": {"init_args": {"cache_dir": str(tmp_path / "tok")}}}}}, "sft.yaml")
    cli_main(["fit", "--config", config])
    return export


@pytest.mark.slow
def test_the_plugin_objective_example_runs_as_written_and_ends_sane(tmp_path, monkeypatch):
    """Before: the example (no KL term, 4 epochs of REINFORCE per rollout) exited 0 with KL 252.9, every response at
    the length cap and EOS rate 0, and wrote over the demo's P3O export. Here on a smaller budget: one epoch of SFT,
    the gold reward instead of the reward model, 16 rollouts; KL < 10 and EOS rate > 0.9 at the end, gold up."""
    code, args = plugin_example()
    (tmp_path / "my_objectives.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert args[:2] == ["fit", "--config"] and "artifacts/quickstart/p3o" not in " ".join(args)
    export_dir = args[args.index("--export_dir") + 1]
    assert re.fullmatch(r"artifacts/quickstart/\w+", export_dir)
    sft = quick_sft(tmp_path)
    config = yaml.safe_load(Path(args[2]).read_text())
    callbacks = config["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("Evaluation"):
            cb["init_args"].update(num_prompts=64, every_n_batches=16)
    small = derived_config(args[2], tmp_path, {
        "trainer": {"limit_train_batches": 16, "callbacks": callbacks, "enable_progress_bar": False,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": {"policy": {"pretrained": sft}, "reward": {"class_path": "datamodules.task.GoldReward"}}},
        "data": {"init_args": {"tokenizer": sft, "source": {"init_args": {"cache_dir": str(tmp_path / "tok")}}}}},
        "rl.yaml")
    cli = cli_main([*args[:2], small, *args[3:], "--export_dir", str(tmp_path / "export")])
    assert type(cli.model.objective).__name__ == "ReinforceWithKL"
    history = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Evaluation").history
    start, end = history[0], history[-1]
    assert end["step"] == 16
    assert end["val/kl"] < 10 and end["val/eos_rate"] > 0.9, end
    assert end["val/gold_reward"] > start["val/gold_reward"] + 0.1, (start, end)
    assert (tmp_path / "export" / "model.safetensors").exists()


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-':
    "glibc's malloc: 0.4-1.1 GB" -> 'glibcs-malloc-04-11-gb'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_markdown_resolves_to_a_file_and_heading():
    """Each `[text](path#anchor)` and `<img src=...>` in a tracked .md file (code blocks aside) names a file of the
    repository and, for an anchor into a .md file, one of its headings."""
    assert heading_anchor("tcmalloc or jemalloc: 0.5-0.7 GB") == "tcmalloc-or-jemalloc-05-07-gb"
    files = [Path(f) for f in subprocess.run(["git", "ls-files", "*.md"], capture_output=True, text=True,
                                             check=True).stdout.split()]
    assert Path("README.md") in files
    broken = []
    for file in files:
        text = re.sub(r"```.*?```", "", file.read_text(), flags=re.S)
        for match in re.finditer(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
            link = match[1] or match[2]
            if re.match(r"[a-z]+:", link):                     # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = file.parent / path if path else file
            if not target.exists():
                broken.append(f"{file}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in {
                    heading_anchor(h) for h in re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)}:
                broken.append(f"{file}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
