"""Gaussian diffusion for every unCLIP stage: schedules and respacing (`schedules`), forward process
and losses (`gaussian`), and samplers as single lax loops (`samplers`). Never imports models."""
