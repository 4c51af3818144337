"""The stacks a hung job prints stay readable when every rank prints at the same moment into one log."""
import subprocess
import sys
import time

PRINTING_RANK = """
import sys, time
from llava_tiny.train.distributed import print_stacks
rank, start = int(sys.argv[1]), float(sys.argv[2])
def waiting_in_a_collective():
    while time.time() < start:
        pass
    for _ in range(20):
        print_stacks(rank)
waiting_in_a_collective()
"""


def test_ranks_printing_at_once_write_whole_lines_each_naming_its_rank(tmp_path):
    log = tmp_path / "job.log"
    with open(log, "wb") as shared:  # one log for both ranks, as the launcher gives them
        start = str(time.time() + 2)
        ranks = [subprocess.Popen([sys.executable, "-c", PRINTING_RANK, str(rank), start], stderr=shared)
                 for rank in (0, 1)]
        assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in lines), \
        [line for line in lines if not line.startswith(("[rank 0] ", "[rank 1] "))][:5]
    for rank in (0, 1):
        own = [line for line in lines if line.startswith(f"[rank {rank}] ")]
        assert sum("Thread MainThread (most recent call last):" in line for line in own) == 20
        assert sum(line.endswith("in waiting_in_a_collective") for line in own) == 20
