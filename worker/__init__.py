"""The worker process: owns one model on MLX and serves it to the gateway over ZeroMQ."""
