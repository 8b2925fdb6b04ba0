"""Monitoring: structured request logs (:mod:`~torchship.monitoring.logs`) and TensorBoard
event files for batch jobs, optimisation runs and benchmarks
(:mod:`~torchship.monitoring.tensorboard`). The server's Prometheus metrics live in
:mod:`torchship.serving.metrics`."""
