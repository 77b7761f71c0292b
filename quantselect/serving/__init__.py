"""Serving layer: a quantized candidate on Ray Serve behind an OpenAI-compatible API.

- ``quantselect.serving.deploy``: ``deploy(name, model_path, config, host=, port=, use_gpu=) -> base URL``,
  ``undeploy(name)``, ``list_deployments()`` (Ray must already be connected).
- ``quantselect.serving.app``: the deployment class, the pure builder ``build_app`` and ``app_builder``
  for Serve config files (``cluster/serve-config.yaml``).

Nothing is re-exported here: the submodule ``deploy`` would shadow a re-exported ``deploy`` function.
Importing this package imports nothing heavy, and this layer never imports ``quantselect.db``.
"""
