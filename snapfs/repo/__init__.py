"""The repository: what a snapshot is and how it is kept in an object store.

``repository`` opens and creates repositories and reads their catalog, index and manifests;
``create`` takes snapshots; ``export`` and ``verify`` read them back; ``gc`` deletes snapshots
and the blobs no snapshot needs any more; ``lock`` keeps deletion from racing creation.
"""
