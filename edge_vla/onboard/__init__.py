"""The onboard real-time loop: cameras, inference worker, chunk scheduling, safety, watchdog, telemetry."""
