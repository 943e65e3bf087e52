"""Switching capture on from the environment, and ranks= outside torch.distributed (no torch).

Each case runs `import visualizer` in a fresh interpreter with the variables
set, as torchrun workers and spawned children do.
"""
import os
import re
import subprocess
import sys

import pytest

from visualizer import VisualizerError
from visualizer._ranks import captures_here, current_rank, validate_ranks

# The fresh interpreters import this checkout, installed or not.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = (
    "from visualizer import get_local; "
    "print(get_local.is_activate, get_local.policy.dtype, get_local.policy.max_entries, "
    "get_local.policy.keep_on_device)"
)


def run_import(env):
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("VISUALIZER_") and key not in ("RANK", "LOCAL_RANK")
    }
    environment.update(env, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment
    )


@pytest.mark.parametrize(
    "env, printed",
    [
        ({}, "False None None False"),
        ({"VISUALIZER_CAPTURE": "0"}, "False None None False"),
        ({"VISUALIZER_CAPTURE": "1"}, "True None None False"),
        (
            {"VISUALIZER_CAPTURE": "yes", "VISUALIZER_DTYPE": "float16",
             "VISUALIZER_MAX_ENTRIES": "12", "VISUALIZER_KEEP_ON_DEVICE": "1"},
            "True float16 12 True",
        ),
        ({"VISUALIZER_CAPTURE": "1", "VISUALIZER_RANKS": "0"}, "True None None False"),
        (
            {"VISUALIZER_CAPTURE": "1", "VISUALIZER_RANKS": "0", "RANK": "1"},
            "False None None False",
        ),
        ({"VISUALIZER_CAPTURE": "1", "VISUALIZER_RANKS": "0,2", "LOCAL_RANK": "2"},
         "True None None False"),
    ],
)
def test_environment_switch(env, printed):
    done = run_import(env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == printed


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VISUALIZER_CAPTURE": "maybe"}, "VISUALIZER_CAPTURE must be one of"),
        ({"VISUALIZER_CAPTURE": "1", "VISUALIZER_RANKS": "0,x"},
         "VISUALIZER_RANKS must be comma-separated non-negative integers; got '0,x'"),
        ({"VISUALIZER_CAPTURE": "1", "VISUALIZER_MAX_ENTRIES": "-3"},
         "VISUALIZER_MAX_ENTRIES must be a non-negative integer; got '-3'"),
        ({"VISUALIZER_CAPTURE": "1", "VISUALIZER_DTYPE": "float17"},
         "VISUALIZER_\\* environment variables: get_local: dtype must name"),
    ],
)
def test_environment_values_that_cannot_be_read_are_named(env, message):
    done = run_import(env)
    assert done.returncode != 0
    assert "VisualizerError" in done.stderr
    assert re.search(message, done.stderr), done.stderr


def test_ranks_are_validated():
    assert validate_ranks(None, "x") is None
    assert validate_ranks(2, "x") == frozenset({2})
    assert validate_ranks([0, 1, 1], "x") == frozenset({0, 1})
    for bad in ([-1], "0", [True], [1.5]):
        with pytest.raises(VisualizerError, match=r"x: ranks must be None, an int or a sequence"):
            validate_ranks(bad, "x")
    with pytest.raises(VisualizerError, match="x: ranks must name at least one rank"):
        validate_ranks([], "x")


def test_rank_from_the_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert current_rank() == 0  # a plain process, not a child
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert current_rank() == 3
    monkeypatch.setenv("RANK", "5")
    assert current_rank() == 5
    assert captures_here(frozenset({5}), "x") and not captures_here(frozenset({0}), "x")


def test_unknown_rank_in_a_child_process_is_an_error(tmp_path):
    script = (
        "import multiprocessing as mp\n"
        "def child(queue):\n"
        "    from visualizer import VisualizerError, get_local\n"
        "    try:\n"
        "        get_local.activate(ranks=[0])\n"
        "        queue.put('activated')\n"
        "    except VisualizerError as error:\n"
        "        queue.put(str(error))\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method('spawn')\n"
        "    queue = mp.Queue()\n"
        "    process = mp.Process(target=child, args=(queue,))\n"
        "    process.start()\n"
        "    print(queue.get(timeout=60))\n"
        "    process.join()\n"
    )
    (tmp_path / "spawn_child.py").write_text(script)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    environment["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, str(tmp_path / "spawn_child.py")],
                          capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "get_local: ranks=[0] needs this process's rank, but torch.distributed is not "
        "initialised and neither RANK nor LOCAL_RANK is set in this child process; switch "
        "capture on after torch.distributed.init_process_group, or set RANK"
    )
