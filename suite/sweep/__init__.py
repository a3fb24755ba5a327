"""Running an experiment: trials in worker processes (local or Ray), progress, the driver."""
