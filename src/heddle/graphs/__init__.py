"""Task graphs: chains, groups, chords, maps and YAML pipelines, and how a goal runs.

* :mod:`~heddle.graphs.model`: the goal and node Structs on the wire, node paths and ids;
* :mod:`~heddle.graphs.paths`: paths and conditions over a goal's values;
* :mod:`~heddle.graphs.canvas`: ``Signature``, ``chain``, ``group``, ``chord``, ``map``, ``GraphResult``;
* :mod:`~heddle.graphs.pipeline`: YAML pipelines, checked with file and line;
* :mod:`~heddle.graphs.run`: one goal walked by an orchestrator;
* :mod:`~heddle.graphs.store`: its checkpoint in Valkey.

The orchestrator actor (:mod:`heddle.orchestrator`) runs goals from the bus.
"""
