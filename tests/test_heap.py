"""keep_freed_memory: a step's freed activations are reused by the next step instead of faulted back in."""

import json
import os
import subprocess
import sys

import pytest

# Two "training steps" in a fresh process: 40 activations of 4 MiB written, then all freed (as the end of
# backward frees them), then the same again; prints the minor page faults the second step took.
STEPS = """
import json, resource, sys
import torch
from lmloom.train.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False

def step():
    acts = [torch.ones(1 << 20) for _ in range(40)]  # 40 x 4 MiB, each page written
    del acts

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def second_step(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_without_page_faults():
    default, kept = second_step("default"), second_step("keep")
    assert kept["applied"] is True
    # 160 MiB is 40,960 pages: glibc's default trimming gives them back and faults them in again; kept,
    # the second step reuses the first one's memory (a few thousand faults remain, none of them its).
    assert default["faults"] > 30_000
    assert kept["faults"] < default["faults"] / 5


def test_a_malloc_setting_of_the_users_own_is_left_alone():
    assert second_step("keep", MALLOC_ARENA_MAX="2")["applied"] is False
