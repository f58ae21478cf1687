"""Running a script's main in-process as its command line would."""
import common


def call(main, argv, capsys):
    """main(argv) under common.run_cli: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    code = 0
    try:
        common.run_cli(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()
