"""The EC2 API client and what its failures mean for a person.

Credentials come only from boto3's normal chain: `--profile` (a profile of ~/.aws/config),
the environment (AWS_ACCESS_KEY_ID ..., AWS_PROFILE), SSO, or an instance role. megafleet never
reads, prints, stores or sends them anywhere: the client lives in this process only. boto3 is
imported inside the functions, so `megafleet --help` never pays for it.

The EC2 endpoint can be redirected with botocore's own `AWS_ENDPOINT_URL_EC2` (used by tests
against a moto server); megafleet adds no variable of its own.

    client = ec2_client(region, profile)      # raises UsageError for a missing region/profile
    with aws_errors(client):                  # botocore errors -> MegafleetError with a fix
        client.describe_instances(...)
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from megafleet.errors import MegafleetError, UsageError

REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
CREDENTIALS_FIX = (
    "configure them the usual AWS way: `aws configure` (keys), `aws sso login "
    "--profile NAME` (SSO) then --profile NAME, AWS_PROFILE or AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY in the environment, or an instance role on EC2"
)
REGION_FIX = (
    "pass --region (e.g. --region us-east-1), set AWS_REGION, or set a default: "
    "aws configure set region us-east-1"
)


def ec2_client(region: str | None = None, profile: str | None = None):
    """An EC2 client for `region` (default: the profile's or environment's region)."""
    import boto3
    import botocore.config
    import botocore.exceptions as bx

    if region is not None and not REGION_RE.match(region):
        raise UsageError(f"--region {region!r} is not an AWS region name", hint=REGION_FIX)
    # retries follow the user's AWS settings (AWS_MAX_ATTEMPTS, retry_mode), like the AWS CLI
    config = botocore.config.Config(connect_timeout=10, read_timeout=60)
    try:  # a missing profile surfaces at the first config lookup, wherever that happens
        session = boto3.Session(
            botocore_session=_botocore_session(), profile_name=profile, region_name=region
        )
        if not session.region_name:
            raise UsageError("no AWS region given or configured", hint=REGION_FIX)
        return session.client("ec2", region_name=session.region_name, config=config)
    except bx.ProfileNotFound:
        raise UsageError(
            f"AWS profile {profile!r} not found in ~/.aws/config or ~/.aws/credentials",
            hint="list profiles with `aws configure list-profiles`, or create one "
            f"with `aws configure --profile {profile}`",
        ) from None
    except bx.NoRegionError:
        raise UsageError("no AWS region given or configured", hint=REGION_FIX) from None


_LOADER = None


def _botocore_session():
    """A fresh session (credentials, profile and environment are read anew) that shares one
    loader, so the 3 MB EC2 API model is parsed once per process, not once per client."""
    global _LOADER
    import botocore.loaders
    import botocore.session

    if _LOADER is None:
        _LOADER = botocore.loaders.create_loader()
    session = botocore.session.Session()
    session.register_component("data_loader", _LOADER)
    paths = _LOADER.search_paths  # boto3 appends its data path per session: keep one copy
    paths[:] = list(dict.fromkeys(paths))
    return session


def region_of(client) -> str:
    return client.meta.region_name


@contextmanager
def aws_errors(client=None):
    """Turn botocore's exceptions into MegafleetErrors that say what to do."""
    import botocore.exceptions as bx

    region = region_of(client) if client is not None else "?"
    try:
        yield
    except bx.NoCredentialsError:
        raise UsageError(
            "no AWS credentials found (profile, environment or instance role)", hint=CREDENTIALS_FIX
        ) from None
    except bx.PartialCredentialsError as exc:
        raise UsageError(f"incomplete AWS credentials: {exc}", hint=CREDENTIALS_FIX) from None
    except (bx.SSOError, bx.TokenRetrievalError) as exc:
        raise UsageError(
            f"AWS SSO login needed or expired ({type(exc).__name__})",
            hint="aws sso login --profile NAME",
        ) from None
    except bx.NoRegionError:
        raise UsageError("no AWS region given or configured", hint=REGION_FIX) from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exc:
        raise MegafleetError(
            f"cannot reach the EC2 API in {region}: {exc}",
            hint="check the region name and this machine's network / proxy",
        ) from None
    except bx.ClientError as exc:
        raise client_error(exc, region) from None


_AUTH_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
}
_EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}


def client_error(exc, region: str) -> MegafleetError:
    """A MegafleetError for an EC2 API error response (the message never holds credentials)."""
    err = exc.response.get("Error", {})
    code, message = err.get("Code", "?"), err.get("Message", str(exc))
    op = getattr(exc, "operation_name", "EC2")
    if code in _AUTH_CODES:
        return UsageError(
            f"AWS rejected the credentials ({code}) in {region}", hint=CREDENTIALS_FIX
        )
    if code in _EXPIRED_CODES:
        return UsageError(
            f"the AWS credentials have expired ({code})",
            hint="refresh them (aws sso login, or new session keys) and retry",
        )
    if code == "UnauthorizedOperation":
        return MegafleetError(
            f"not allowed: {op} in {region} ({message.split('Encoded')[0].strip()})",
            hint=f"grant the IAM permission ec2:{op} to this user or role",
        )
    if code.startswith("InvalidInstanceID"):
        return UsageError(f"{op}: {message}", hint="check the --ids (megafleet ec2 list)")
    if code == "IncorrectInstanceState":
        return MegafleetError(f"{op}: {message}", hint="megafleet ec2 list shows each state")
    return MegafleetError(f"AWS {op} failed in {region}: {code}: {message}")
