"""Training: Ray Train data-parallel workers over a prepared dataset, writing a run folder.
The model and the step (step.py, windows.py) run without Ray, so a plain PyTorch script can time them."""
