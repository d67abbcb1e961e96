"""The embedding pipeline of ``altclip-fast embed``: inputs -> decode -> engine (local or Ray) ->
parts -> writer (one file, or clip-retrieval shards), resumable at any point.

- ``inputs``: every input kind -> one ``Listing``;      ``decode``: an image -> a uint8 crop;
- ``encode``: the model step;                          ``parts``: a batch's saved embeddings;
- ``plan``: the run's plan and the resume policy;      ``files``: atomic writes, full disks, the lock;
- ``local_engine``, ``ray_engine`` (and ``embed_dataset``, the Ray Data API);
- ``single_file`` (and ``load_embeddings``), ``shards``: the writers;
- ``job``: what a run is asked; ``run``: the orchestration.
"""
