"""The bundled workflow templates: one JSON file each, shipped as this package's data so that an installed
gateway (the Docker image's), not only a checkout, registers them (app.templates.store)."""
