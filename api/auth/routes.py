"""The tokens resource under /api/v1/tokens (scope `admin`, enforced by api/auth/access.py).

A new token's secret is in the 201 response and nowhere else, ever. `DELETE` revokes: the row is
kept (revoked tokens stay listed, with when), and the token stops working at once, dashboard
sessions made with it included.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from api.auth import tokens as service
from api.auth.access import principal_of
from api.auth.models import ApiToken, TokenCreate, TokenCreated, TokenPublic
from api.deps import SessionDep
from api.errors import problem_responses, require_json

router = APIRouter(prefix="/tokens", tags=["tokens"])

TokenRef = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="a token's id (or unique name)")
]


def _public(token: ApiToken) -> TokenPublic:
    return TokenPublic.model_validate(token, from_attributes=True)


@router.post(
    "",
    status_code=201,
    response_model=TokenCreated,
    summary="Create an API token (its secret is shown this once)",
    dependencies=[Depends(require_json)],
    responses=problem_responses(415, 422),
)
def create_token(
    body: TokenCreate, session: SessionDep, request: Request, response: Response
) -> TokenCreated:
    token, secret = service.create_token(session, body, created_by=principal_of(request).name)
    response.headers["Location"] = f"/api/v1/tokens/{token.id}"
    response.headers["Cache-Control"] = "no-store"
    return TokenCreated(**_public(token).model_dump(), token=secret)


@router.get("", response_model=list[TokenPublic], summary="List API tokens (never their secrets)")
def list_tokens(session: SessionDep) -> list[TokenPublic]:
    return [_public(t) for t in service.list_tokens(session)]


@router.get(
    "/{token_ref}",
    response_model=TokenPublic,
    summary="Get an API token",
    responses=problem_responses(404, 409, 422),
)
def get_token(token_ref: TokenRef, session: SessionDep) -> TokenPublic:
    return _public(service.find_token(session, token_ref))


@router.delete(
    "/{token_ref}",
    response_model=TokenPublic,
    summary="Revoke an API token",
    responses=problem_responses(404, 409, 422),
)
def revoke_token(token_ref: TokenRef, session: SessionDep) -> TokenPublic:
    return _public(service.revoke_token(session, token_ref))
