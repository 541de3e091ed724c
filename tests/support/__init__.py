"""What the test rooms share (no tests here): the engine's fixtures, callbacks that kill or stop a run and
run_worker (engine.py), the SFT fixtures (lm.py) and the RL fixtures (rl.py)."""
