"""The SLURM example stays runnable: valid bash, and its tinymim command loads (recipe and overrides)."""
import shlex
import subprocess
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tinymim_command(script: str) -> list[str]:
    """The words after `-m tinymim` in a script, line continuations joined, variables substituted."""
    text = script.replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "-m tinymim" in ln)
    words = shlex.split(line.split("-m tinymim", 1)[1].replace('"$RUN"', "/checkpoints/run"))
    return words


def test_slurm_example_is_valid_bash_and_its_command_loads():
    from tinymim.tasks import load_config

    script = EXAMPLES / "slurm" / "distill_vit_small.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=TERM@" in text and "scontrol requeue" in text
    words = tinymim_command(text)
    task, rest = words[0], words[1:]
    config = rest[rest.index("--config") + 1]
    overrides = [w for w in rest if "=" in w and not w.startswith("--")]
    cfg = load_config(task, config, overrides)
    assert cfg.data.name == "shards" and cfg.data.decode == "device" and cfg.train.compile is True
    assert cfg.train.batch_size == 4096  # the paper's global batch, over 32 GPUs
