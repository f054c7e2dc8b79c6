"""Users test their own tasks with the pytest plugin's fixtures."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_a_user_can_test_their_tasks_with_the_plugin_fixtures(pytester):
    pytester.makepyfile(
        shopmod="""
        import heddle
        app = heddle.Heddle("pluginshop")

        @app.task
        def add(x: int, y: int) -> int:
            return x + y
        """,
        conftest="""
        import pytest
        import shopmod

        @pytest.fixture
        def heddle_app():
            return shopmod.app
        """,
        test_shop="""
        import shopmod

        def test_add(heddle_worker):
            assert shopmod.add.delay(2, 3).get(timeout=10) == 5

        def test_add_again(heddle_worker, heddle_servers):
            assert shopmod.app.settings.nats_url == heddle_servers.nats_url
            assert shopmod.add.delay(1, 1).get(timeout=10) == 2
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)
