"""scripts/lib/launch.sh picks the launcher's port: a free one unless MASTER_PORT is set (a fixed default killed
the second job on a machine with EADDRINUSE after minutes of start-up)."""
import errno
import os
import re
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEPSPEED_DEFAULT_PORT = 29500


def _launch(tmp_path, env_extra):
    """launch() as the training scripts call it, with a stand-in `deepspeed` that prints what it was given."""
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\necho "deepspeed $*"\n')
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "MASTER_PORT"}
    env.update(PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}", **env_extra)
    done = subprocess.run(["bash", "-c", 'source scripts/lib/launch.sh && launch --flag value'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    port = int(re.search(r"--master_port (\d+)", done.stdout).group(1))
    return port, done


def test_launch_picks_a_port_nothing_listens_on_while_the_default_one_is_taken(tmp_path):
    """Checked against a real listening socket on DeepSpeed's default port (another job's)."""
    other_job = socket.socket()
    try:
        other_job.bind(("", DEEPSPEED_DEFAULT_PORT))
        other_job.listen()
    except OSError as err:  # already held by something else on this machine: just as good
        assert err.errno == errno.EADDRINUSE
    try:
        port, done = _launch(tmp_path, {"NUM_GPUS": "1"})
    finally:
        other_job.close()
    assert port != DEEPSPEED_DEFAULT_PORT
    assert f"using port {port}" in done.stderr
    assert "--num_gpus 1" in done.stdout and done.stdout.rstrip().endswith("--flag value")
    with socket.socket() as probe:  # free: rank 0 can bind it
        probe.bind(("", port))


def test_launch_keeps_the_port_the_user_set(tmp_path):
    """MASTER_PORT, as DeepSpeed's own launcher takes it (--master_port), wins over the free pick."""
    port, done = _launch(tmp_path, {"MASTER_PORT": "29517"})
    assert port == 29517 and "using port" not in done.stderr


def test_no_script_starts_a_launcher_but_through_launch_sh():
    """Every scripts/*.sh reaches DeepSpeed's launcher through lib/launch.sh (the one place that picks the port),
    and none names a fixed port."""
    scripts = os.path.join(ROOT, "scripts")
    for name in sorted(os.listdir(scripts)):
        if name.endswith(".sh"):
            with open(os.path.join(scripts, name)) as f:
                text = f.read()
            assert not re.search(r"MASTER_PORT:?-\d|--master_port[ =]\d", text), name
            assert not re.search(r"(^|[\s;(|&])(deepspeed|torchrun|accelerate launch)\s", text, re.M), name
