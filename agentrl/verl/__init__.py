"""The verl backend: this project's rollout, estimators and losses inside verl's trainer, with no fork.

- :mod:`agentrl.verl.plugin`: the ``verl.plugins`` entry point; importing it (which ``import verl``
  does in every verl process) registers the agent loop, the estimators and the losses.
- :mod:`agentrl.verl.agent_loop`: the ``agentrl`` agent loop and its engine over verl's LLM servers.
- :mod:`agentrl.verl.algorithms`: estimators and policy losses in verl's calling convention.
- :mod:`agentrl.verl.trainer`: verl's v1 trainers registered again as ``agentrl_*``, which hand
  ``agentrl_gigpo`` the agent loop's per-turn fields.
- :mod:`agentrl.verl.export`: any env's data in verl's parquet schema.
- :mod:`agentrl.verl.launch`: the ``python -m verl.trainer.main_ppo`` command for a run config.

Only :mod:`~agentrl.verl.export` and :mod:`~agentrl.verl.launch` run without verl installed.
"""
