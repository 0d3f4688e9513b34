"""Settings from flags and PETSAGE_GRPC_* variables: validation, precedence, help."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from petsage_grpc import settings as config
from tests.support import Start, run_cli, tool


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--grace", "-1"], {}, "invalid --grace='-1': should be ≥ 0 seconds"),
        (["--grace", "soon"], {}, "invalid --grace='soon': expected a number of seconds"),
        (["--log-format", "xml"], {}, "invalid --log-format='xml': expected one of text, json"),
        (["--address", "nowhere"], {}, "invalid --address='nowhere': expected HOST:PORT"),
        (["--address", "127.0.0.1:70000"], {}, "invalid --address='127.0.0.1:70000': port should be in 0..65535"),
        (["--log-timeout", "0"], {}, "invalid --log-timeout='0': should be > 0 seconds"),
        (["--check-interval", "nan"], {}, "invalid --check-interval='nan': expected a finite number of seconds"),
        (["--grace", "inf"], {}, "invalid --grace='inf': expected a finite number of seconds"),
        # 2,672 probe records in 4 s were logged at 0.001 s.
        (["--check-interval", "0.001"], {}, "invalid --check-interval='0.001': should be ≥ 0.1 seconds"),
        ([], {"PETSAGE_GRPC_GRACE": "abc"}, "invalid PETSAGE_GRPC_GRACE='abc': expected a number of seconds"),
        ([], {"PETSAGE_GRPC_LOG_LEVEL": "LOUD"}, "invalid PETSAGE_GRPC_LOG_LEVEL='LOUD': expected one of DEBUG"),
        ([], {"PETSAGE_GRPC_ADDRESS": "50051"}, "invalid PETSAGE_GRPC_ADDRESS='50051': expected HOST:PORT"),
        (["--drain", "-2"], {}, "invalid --drain='-2': should be ≥ 0 seconds"),
        (["--max-watchers", "0"], {}, "invalid --max-watchers='0': should be ≥ 1"),
        (["--max-watchers", "lots"], {}, "invalid --max-watchers='lots': expected a whole number"),
        (["--stall-limit", "0.1"], {}, "invalid --stall-limit='0.1': should be ≥ 0.5 seconds"),
        ([], {"PETSAGE_GRPC_REFLECTION": "maybe"},
         "invalid PETSAGE_GRPC_REFLECTION='maybe': expected true or false (or yes/no, on/off, 1/0)"),
        (["--tls-key", "/k.pem"], {}, "--tls-cert and --tls-key go together: give both to serve TLS"),
        (["--tls-client-ca", "/ca.pem"], {}, "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--max-streams", "0"], {}, "invalid --max-streams='0': should be ≥ 1"),
        # grpc core takes C ints (times in milliseconds): larger values are refused up front.
        (["--idle-timeout", "1e7"], {}, "invalid --idle-timeout='1e7': should be ≤ 2147483 seconds"),
        (["--max-connections", "2147483648"], {}, "invalid --max-connections='2147483648': should be ≤ 2147483647"),
        (["--max-watchers", "2000000"], {}, "invalid --max-watchers='2000000': should be ≤ 1000000"),
        (["--workers", "1000"], {}, "invalid --workers='1000': should be ≤ 256"),
        (["--max-connections", "-5"], {}, "invalid --max-connections='-5': should be ≥ 1"),
        (["--idle-timeout", "0"], {}, "invalid --idle-timeout='0': should be > 0 seconds"),
        (["--keepalive-time", "inf"], {}, "invalid --keepalive-time='inf': expected a finite number of seconds"),
        (["--keepalive-min-interval", "x"], {}, "invalid --keepalive-min-interval='x': expected a number"),
        ([], {"PETSAGE_GRPC_LOG_PROBES": "often"}, "invalid PETSAGE_GRPC_LOG_PROBES='often': expected true or false"),
        ([], {"PETSAGE_GRPC_SMOKE_DETAILS": "some"}, "invalid PETSAGE_GRPC_SMOKE_DETAILS='some': expected one of"),
        ([], {"PETSAGE_GRPC_LOG_FILE": "/no/such/dir/x.log"},
         "cannot open --log-file '/no/such/dir/x.log': No such file or directory"),
    ],
)
def test_bad_setting_stops_before_binding_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    done = run_cli("serve", *args, env={"PETSAGE_GRPC_ADDRESS": "127.0.0.1:0", **env})

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("petsage-grpc serve: error: " + message)
    assert "serving on" not in done.stdout


def test_unknown_flag_is_a_usage_error() -> None:
    done = run_cli("serve", "--colour", "blue")

    assert done.returncode == 1
    assert "unrecognized arguments: --colour blue" in done.stderr


def test_flag_wins_over_environment(start_server: Start) -> None:
    server = start_server(
        "--log-format", "text", "--grace", "1",
        env={"PETSAGE_GRPC_LOG_FORMAT": "json", "PETSAGE_GRPC_GRACE": "not-a-number"},
    )

    assert " - petsage_grpc.server - INFO - serving on " in server.stdout.wait_for("serving on").string


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, (True, False)),
        (["--log-probes", "--no-access-log"], {}, (False, True)),
        ([], {"PETSAGE_GRPC_LOG_PROBES": "yes", "PETSAGE_GRPC_ACCESS_LOG": "off"}, (False, True)),
        (["--log-probes"], {"PETSAGE_GRPC_LOG_PROBES": "false"}, (True, True)),
    ],
)
def test_switches_turn_their_default_over(args: list[str], env: dict[str, str], expected: tuple[bool, bool]) -> None:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    settings = config.resolve(parser.parse_args(args), env)

    assert (settings.access_log, settings.log_probes) == expected


def test_address_from_environment(start_server: Start) -> None:
    server = start_server(address="", env={"PETSAGE_GRPC_ADDRESS": "127.0.0.1:0"})

    assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")
    assert server.health("") == 1


def test_serve_help_documents_every_flag_and_variable() -> None:
    done = run_cli("serve", "--help")

    assert done.returncode == 0
    for setting in config.SETTINGS:
        assert setting.flag in done.stdout
        assert setting.env in done.stdout


def test_console_script_and_module_agree() -> None:
    script = tool("petsage-grpc")
    from_script = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30, check=False)
    from_module = run_cli("--version")

    assert from_script.returncode == from_module.returncode == 0
    assert from_script.stdout == from_module.stdout
    assert from_script.stdout.startswith("petsage-grpc ")


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_configuration_table_lists_every_setting() -> None:
    text = README.read_text()

    for setting in config.SETTINGS:
        metavar = (" " + setting.metavar).replace("|", "\\|") if setting.metavar else ""  # escaped in a table
        flag = f"`{setting.flag}{metavar}`"
        row = next((line for line in text.splitlines() if line.startswith(f"| {flag} ")), None)
        assert row is not None, flag
        assert f"`{setting.env}`" in row
        assert (f"`{setting.default_text}`" if setting.default is not None else "| none |") in row


def test_ci_runs_the_readme_test_command() -> None:
    first_lines = README.read_text().split("```")[1].splitlines()
    [test_command] = [line.split("  #")[0].strip() for line in first_lines if "pytest" in line]

    assert test_command in (README.parent / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("grace", -1.0, "'grace' should be ≥ 0 seconds"), ("log_format", "xml", "'log_format' expected one of"),
     ("address", "x", "'address' expected HOST:PORT")],
)
def test_settings_built_in_code_are_validated_too(field: str, value: object, message: str) -> None:
    with pytest.raises(config.SettingError, match=message):
        config.ServeSettings(**{field: value})  # type: ignore[arg-type]


def test_settings_built_in_code_are_normalized() -> None:
    settings = config.ServeSettings(log_format="JSON", log_level="debug", grace=3)

    assert (settings.log_format, settings.log_level, settings.grace) == ("json", "DEBUG", 3.0)


@pytest.mark.parametrize(("command", "message"), [
    (["serve", "--addres", "127.0.0.1:0"], "petsage-grpc serve: error: unrecognized arguments: --addres 127.0.0.1:0"),
    (["serve", "--log-form", "json"], "petsage-grpc serve: error: unrecognized arguments: --log-form json"),
    (["probe", "-ad", "127.0.0.1:1"], "error: flag provided but not defined: -ad"),
    (["probe", "-addr", "127.0.0.1:1", "-serv", "readiness"], "error: flag provided but not defined: -serv"),
    (["probe", "--add", "127.0.0.1:1"], "error: flag provided but not defined: --add"),
    (["smoke", "--addr", "127.0.0.1:1", "--js"], "petsage-grpc smoke: error: flag provided but not defined: --js"),
])
def test_no_command_accepts_a_flag_it_does_not_define(command: list[str], message: str) -> None:
    """As reported: ``serve --addres`` started a server and ``probe -ad ... -serv`` exited 0."""
    done = run_cli(*command, timeout=30)

    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (1, [message], "")


def test_misspelt_variables_are_warned_of_once_with_the_closest_setting(start_server: Start) -> None:
    server = start_server("--workers", "2", env={"PETSAGE_GRPC_ADRESS": "127.0.0.1:1", "PETSAGE_GRPC_LOGFILE": "x",
                                                 "PETSAGE_GRPC_COLOUR": "blue"})
    server.signal()
    assert server.wait() == 0

    warnings = [line.split(" - WARNING - ")[1] for line in server.stdout.lines if " - WARNING - " in line]
    assert warnings == [
        "PETSAGE_GRPC_ADRESS is not a setting and was ignored: did you mean PETSAGE_GRPC_ADDRESS?",
        "PETSAGE_GRPC_COLOUR is not a setting and was ignored: serve --help lists every variable",
        "PETSAGE_GRPC_LOGFILE is not a setting and was ignored: did you mean PETSAGE_GRPC_LOG_FILE?",
    ]  # by the supervisor alone, not again by each worker


@pytest.mark.parametrize("command", [["--help"], ["serve", "--help"], ["smoke", "--help"], ["probe", "--help"]])
def test_help_is_plain_text_with_whole_sentences(command: list[str]) -> None:
    done = run_cli(*command)
    text = " ".join(done.stdout.split())  # as read, whatever the line wrapping

    assert done.returncode == 0
    assert not re.search(r"``|:class:|:func:|:attr:|:data:", text), done.stdout  # no reST markup
    assert "may sign the server's certificate" in text or command[0] in ("--help", "serve")  # a whole sentence
    if command[0] == "probe":
        assert re.search(r"--wait DURATION retry with backoff .*\[default 0s: one attempt\]", text)
        assert "SECONDS" not in text
    if command[0] == "serve":
        assert "--log-level LEVEL lowest level logged: DEBUG, INFO, WARNING, ERROR or CRITICAL" in text
        assert "--address HOST:PORT|unix:PATH address to listen on: HOST:PORT" in text
        assert "metrics need one worker" in text


def test_every_package_ci_installs_is_named_beside_the_readme_commands() -> None:
    """As reported: without h2load 7 tests failed, and only the benchmark section said so."""
    after_commands = README.read_text().split("```")[2].split("\n## ")[0]
    ci_script = (README.parent / ".ci" / "run").read_text().replace("\\\n", " ")  # continuation lines joined
    installs = re.findall(r"apt-get install -y -qq ([^>&|]+)", ci_script)
    packages = {package for line in installs for package in line.split()}

    assert packages and all(package in after_commands for package in packages)
    assert "Prerequisites:" in after_commands and "root" in after_commands
