"""Media layer shared by the CLI, the service and the trainer: video files, padding,
latent files and metrics. May import `model`, never `service` or `training`."""
