"""Fixtures every test module can use: a private RabbitMQ vhost, a private database."""

from tests.broker_fixtures import rabbit_vhost

pytest_plugins = ["tests.secret_scan"]

__all__ = ["rabbit_vhost"]
