"""The shipped configs (real GPUs and the tiny CPU demo) and the script that regenerates the tiny demo model."""
