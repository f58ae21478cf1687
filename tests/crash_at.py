"""Run a method script that dies after a given step as a killed worker would (exit 137, no checkpoint,
no closing line): python tests/crash_at.py STEP script.py [flags...]; under torchrun, this file is
the script. The product has no crash hook: the test wraps Run.step from outside."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

step, script = int(sys.argv[1]), sys.argv[2]
real_step = common.Run.step


def step_then_die(self, terms, lr):
    real_step(self, terms, lr)
    if self.steps == step:
        os._exit(137)


common.Run.step = step_then_die
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
