"""The operations page (``mailroute web``): a small Flask application over the database, the
broker and the workers' metrics; see :mod:`shared.web.app`."""
