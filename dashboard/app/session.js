// Who the caller is and what their roles allow, from the public API alone
// (`viewer`, `Account.members`, `Workspace.members`). A button is shown only when the
// API would accept it (docs/API.md §4, §6).
import { gql } from './api.js';

export const VIEWER_Q = `query Viewer {
  viewer {
    user { id name email }
    accounts {
      id name totalBalance verified
      members { role user { id } }
      workspaces { id name balance reserved available members { role user { id } } }
    }
  }
}`;

export async function loadSession() {
  const data = await gql(VIEWER_Q);
  return session(data.viewer);
}

export function session(viewer) {
  const me = viewer.user; // null: the platform admin token
  const accounts = viewer.accounts;
  const workspaces = new Map();
  for (const account of accounts) for (const ws of account.workspaces) workspaces.set(ws.id, { ...ws, account });
  const accountRole = (accountId) => {
    if (!me) return 'PLATFORM';
    const account = accounts.find((a) => a.id === accountId);
    return account?.members.find((m) => m.user.id === me.id)?.role ?? null;
  };
  const accountAdmin = (accountId) => ['PLATFORM', 'OWNER', 'ADMIN'].includes(accountRole(accountId));
  const workspaceRole = (wsId) => {
    const ws = workspaces.get(wsId);
    if (!ws) return null;
    if (accountAdmin(ws.account.id)) return accountRole(ws.account.id) === 'PLATFORM' ? 'PLATFORM' : 'ADMIN';
    return ws.members.find((m) => m.user.id === me.id)?.role ?? null;
  };
  const workspaceAdmin = (wsId) => ['PLATFORM', 'ADMIN'].includes(workspaceRole(wsId));
  return { me, accounts, workspaces, accountRole, accountAdmin, workspaceRole, workspaceAdmin };
}
