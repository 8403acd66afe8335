"""The library the pipeline's stages use: labels, reference files, images, packed arrays, tasks,
networks, batches, runtime, training pieces, metrics, checked params, atomic writes."""
