"""Engine kinds: what an engine is, how it is installed, checked and launched. No Ray here.

Where things are:

- ``base``, ``llamacpp``, ``vllm``, ``openai``, ``registry``: the providers. Each has
  ``plan_install(config, node)``, ``install(plan, progress)``, ``check_ready(node, config)``
  and ``prepare(model, config, node)`` besides its static declarations.
- ``plan``: ``InstallPlan`` (mode, inputs, cache key), ``InstallRecord``, policy gates.
- ``installers/``: one module per install mode (package, binary, source, container)
  and ``install()``, idempotent and single-flight per install directory.
- ``readiness``: readiness by looking (imports, ``--version``, ``GET /models``).
- ``launch``: ``PreparedEngine``, ``ModelRef`` and llama.cpp flag normalization.
- ``supervisor``: the ``Supervisor`` of one engine process.
- ``node``: ``Node`` (facts + settings) and ``detect_node_facts``.
- ``sandbox``: environment allow-list and the unprivileged engine user.
- ``__main__``: ``python -m engines install|check|run``.
"""
