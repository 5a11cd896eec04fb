// A real OpenID Connect provider for the tests (`oidc-provider` from npm, installed by .ci/setup
// into var/oidc), standing in for Microsoft Entra ID on loopback.
//
//   node tests/oidc_provider.mjs <node_modules dir> <config.json>
//
// config.json: {"client_id", "client_secret", "redirect_uri", "accounts_file"}, and
// optionally "more_redirect_uris" (the console under a real server, for the Chromium test). It listens on
// a free 127.0.0.1 port and prints one line of JSON: {"issuer": "http://127.0.0.1:<port>"}.
//
// The accounts file is read again on every request, so a test changes a person's app roles,
// groups or `disabled` between sign-ins by rewriting it:
//   {"<sub>": {"name", "email", "preferred_username", "oid", "roles": [...], "groups": [...],
//              "disabled": false, "overage": false}}
// The sign-in page is a plain form (login = the account's key); a disabled or unknown account
// is refused with access_denied, as Entra refuses a disabled person. Consent is granted
// without a page, as an administrator's tenant-wide consent does in Entra.
//
// Two test controls, on POST /test/...:
//   /test/clock   {"offset_ms": n}   the provider's clock runs n ms ahead of the real one, so
//                                    it agrees with a test that moved Python's clock
//   /test/tamper  {"mode": m}        the token endpoint's next ID tokens are altered on their way
//                                    out: "payload" (roles raised, signature kept),
//                                    "audience" or "nonce" (re-signed with the real key), or
//                                    "" (off)
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, configFile] = process.argv.slice(2);
const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
const { default: Provider } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href);

const realNow = Date.now;
let offsetMs = 0;
Date.now = () => realNow() + offsetMs;
let tamper = '';

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key', alg: 'RS256', use: 'sig' };

function accounts() {
  return JSON.parse(fs.readFileSync(config.accounts_file, 'utf8'));
}

function b64(value) {
  return Buffer.from(value).toString('base64url');
}

function altered(idToken) {
  const [header, payload, signature] = idToken.split('.');
  const claims = JSON.parse(Buffer.from(payload, 'base64url').toString());
  if (tamper === 'payload') {
    claims.roles = ['MSHT.Admin'];
    return `${header}.${b64(JSON.stringify(claims))}.${signature}`;
  }
  if (tamper === 'audience') {
    // For other applications only, though naming us as the party it was given to: only the
    // audience check itself can catch this one (an azp of another client is caught by azp's).
    claims.aud = ['another-application', 'a-third-application'];
    claims.azp = config.client_id;
  }
  if (tamper === 'nonce') claims.nonce = 'a-nonce-from-another-sign-in';
  const input = `${header}.${b64(JSON.stringify(claims))}`;
  return `${input}.${crypto.sign('sha256', Buffer.from(input), privateKey).toString('base64url')}`;
}

const server = http.createServer();
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: config.client_id,
    client_secret: config.client_secret,
    redirect_uris: [config.redirect_uri, ...(config.more_redirect_uris || [])],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [jwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  pkce: { methods: ['S256'], required: () => true },
  features: { devInteractions: { enabled: false } },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'oid', 'roles', 'groups', '_claim_names'],
    email: ['email'],
  },
  conformIdTokenClaims: false, // the claims in the ID token itself, as Entra puts them
  async findAccount(ctx, id) {
    const account = accounts()[id];
    if (!account || account.disabled) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          name: account.name,
          email: account.email,
          preferred_username: account.preferred_username,
          oid: account.oid,
          roles: account.roles || [],
          // Entra's overage: too many groups to list, a pointer to a Graph call instead
          ...(account.overage ? { _claim_names: { groups: 'src1' } }
            : { groups: account.groups || [] }),
        };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile email');
    await grant.save();
    return grant;
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: { AccessToken: 3600, AuthorizationCode: 60, IdToken: 3600, Interaction: 600,
    Session: 86400, Grant: 86400 },
});

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token' && tamper && ctx.body && ctx.body.id_token) {
    ctx.body = { ...ctx.body, id_token: altered(ctx.body.id_token) };
  }
});

function body(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (chunk) => { data += chunk; });
    req.on('end', () => resolve(data));
    req.on('error', reject);
  });
}

const callback = provider.callback();
server.on('request', async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    if (req.method === 'POST' && url.pathname.startsWith('/test/')) {
      const value = JSON.parse(await body(req) || '{}');
      if (url.pathname === '/test/clock') offsetMs = Number(value.offset_ms || 0);
      else if (url.pathname === '/test/tamper') tamper = String(value.mode || '');
      else { res.writeHead(404).end(); return; }
      res.writeHead(204).end();
      return;
    }
    const match = url.pathname.match(/^\/interaction\/([\w-]+)(\/login)?$/);
    if (match) {
      const details = await provider.interactionDetails(req, res);
      if (req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(`<!doctype html><title>Sign in</title><h1>Sign in (${details.prompt.name})</h1>
<form method="post" action="/interaction/${details.uid}/login">
<label>Account <input name="login"></label><button>Sign in</button></form>`);
        return;
      }
      const login = new URLSearchParams(await body(req)).get('login') || '';
      const account = accounts()[login];
      const result = account && !account.disabled
        ? { login: { accountId: login } }
        : { error: 'access_denied', error_description: 'This account is disabled or unknown.' };
      await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
      return;
    }
    callback(req, res);
  } catch (err) {
    res.writeHead(500, { 'content-type': 'text/plain' });
    res.end(String(err && err.stack));
  }
});

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
