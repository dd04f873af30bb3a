"""Client data: loading a labelled source, Flower partitions (Dirichlet, shards), preprocessing, batch order."""
