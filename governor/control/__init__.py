"""Where rules meet jobs: the controller, the only caller of the actuators."""
