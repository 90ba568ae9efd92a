"""What the host and the device share: family loading and checks, schedulers, the relay state and loop."""
