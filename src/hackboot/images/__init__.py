"""Images service: the disks instances boot from (`/v1/images`), their store and the built-in images.

`service.py` holds the rules (and the functions compute calls: `resolve_image`, `image_file`,
`create_snapshot_record`, `finish_snapshot`, `fail_snapshot`), `store.py` the files and their
validation with qemu-img, `api.py` the HTTP layer; `builder/` builds the built-in guest images.
"""
