"""A demo's --out: a rerun of the same command continues its interrupted folder; other arguments, another demo's
folder and a folder of user files are refused with nothing touched (scripts/lib/demo_out.sh). The refusals
come before anything runs; the continued run here stops at validation on purpose (a missing image), so no
test trains (test_demo.py reruns a finished demo)."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=120):
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_user_files_is_refused_and_left_untouched(tmp_path):
    """Peer: a user's own folder (no demo_args.txt), for both demos."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for script in ("demo.sh", "demo_dpo.sh"):
        done = _run(script, "--out", str(out))
        assert done.returncode == 2, done.stderr
        assert "was not made by a demo" in done.stderr and "nothing is overwritten" in done.stderr
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_an_interrupted_demo_is_continued_by_the_same_command_and_refused_to_others(tmp_path):
    """Peer: the folder demo.sh itself leaves when it stops part-way (here at validation), rerun by demo.sh
    with the same arguments, with other arguments, and by demo_dpo.sh."""
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps([{"id": "a", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]}]))
    args = ["--data", str(data), "--out", str(out), "--steps", "8"]
    first = _run("demo.sh", *args)
    assert first.returncode == 1 and "has errors" in first.stderr, first.stderr[-2000:]
    assert (out / "demo_args.txt").is_file() and (out / "validate_report.json").is_file()
    assert not (out / "demo_steps_done.txt").exists()  # the data step did not finish

    again = _run("demo.sh", *args)  # continued: the unfinished step runs again (and stops again, same data)
    assert "continuing the interrupted run" in again.stdout and "steps done: none" in again.stdout
    assert again.returncode == 1 and "has errors" in again.stderr, again.stderr[-2000:]

    before = _snapshot(out)
    other = _run("demo.sh", *args[:-1], "12", "--seed", "3")
    assert other.returncode == 2, other.stderr
    assert "holds a demo run with other arguments" in other.stderr
    assert f"--steps: '8' (in {out}) != '12' (now)" in other.stderr
    assert f"--seed: '0' (in {out}) != '3' (now)" in other.stderr and "--data" not in other.stderr
    dpo = _run("demo_dpo.sh", "--out", str(out))
    assert dpo.returncode == 2 and "script: 'demo.sh' (in" in dpo.stderr, dpo.stderr
    assert _snapshot(out) == before
