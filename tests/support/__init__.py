"""What the test rooms share (no tests here): the engine's, the SFT and the RL fixtures (engine.py, lm.py, rl.py), the
callbacks that record, kill or stop a run (callbacks.py), and run_worker (workers.py)."""
